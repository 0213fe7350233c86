use std::path::{Path, PathBuf};

use crate::error::{missing_file, EngineError, Result};

/// The files of one checkpoint directory.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// safetensors files, in shard order.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json` when the checkpoint is sharded.
    pub weight_index: Option<PathBuf>,
}

impl ModelFiles {
    /// Lists the files of a checkpoint directory; errors name what is missing.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(missing_file(
                config,
                " (every checkpoint needs config.json)",
            ));
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (weights, weight_index) = if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| EngineError::io_path("reading", &index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                EngineError::Weight(format!("{} is not valid JSON: {e}", index.display()))
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    EngineError::Weight(format!("{} has no weight_map object", index.display()))
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            files.sort();
            files.dedup();
            let mut paths = Vec::with_capacity(files.len());
            for f in files {
                let p = dir.join(&f);
                if !p.is_file() {
                    return Err(missing_file(p, " (named in model.safetensors.index.json)"));
                }
                paths.push(p);
            }
            (paths, Some(index))
        } else if single.is_file() {
            (vec![single], None)
        } else {
            let bin = dir.join("pytorch_model.bin");
            let hint = if bin.is_file() {
                " (only pytorch_model.bin is present; convert the checkpoint to safetensors)"
            } else {
                " (expected model.safetensors or model.safetensors.index.json)"
            };
            return Err(missing_file(single, hint));
        };
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            weights,
            weight_index,
        })
    }

    /// A file of the checkpoint directory, if present.
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        p.is_file().then_some(p)
    }
}

/// Turns `--model` into a directory: a local path, or an `org/name` id looked up
/// in the local Hugging Face cache (downloaded with hf-hub when not cached and
/// the hub is reachable).
pub fn resolve_model_dir(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(EngineError::NotFound(format!(
            "model path {model} is not a directory"
        )));
    }
    if !looks_like_repo_id(model) {
        return Err(EngineError::NotFound(format!(
            "model {model} not found: no such directory, and not an `org/name` model id"
        )));
    }
    let revision = revision.unwrap_or("main");
    if let Some(dir) = find_in_hf_cache(&hub_cache_dir(), model, revision) {
        return Ok(dir);
    }
    download_with_hf_hub(model, revision)
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if ok_part(a) && ok_part(b))
}

/// The hub cache directory, honouring HF_HUB_CACHE and HF_HOME as huggingface_hub does.
pub(crate) fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HUGGINGFACE_HUB_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let base = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| home_dir().join(".cache"));
            base.join("huggingface")
        });
    home.join("hub")
}

fn home_dir() -> PathBuf {
    std::env::var("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/"))
}

/// `models--org--name/snapshots/<sha>` for a branch/tag name (via `refs/`) or a commit sha.
fn find_in_hf_cache(cache: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    let direct = snapshots.join(revision);
    if direct.join("config.json").is_file() {
        return Some(direct);
    }
    let sha = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let dir = snapshots.join(sha.trim());
    dir.join("config.json").is_file().then_some(dir)
}

fn download_with_hf_hub(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let not_cached = || {
        format!(
            "model {repo_id} (revision {revision}) is not in the Hugging Face cache at {}",
            hub_cache_dir().display()
        )
    };
    if offline {
        return Err(EngineError::NotFound(format!(
            "{} and HF_HUB_OFFLINE is set",
            not_cached()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub_cache_dir())
        .with_progress(false)
        .build()
        .map_err(|e| EngineError::NotFound(format!("{}; hub client failed: {e}", not_cached())))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let fetch_err = |file: &str, e: hf_hub::api::sync::ApiError| {
        EngineError::NotFound(format!("{}; downloading {file} failed: {e}", not_cached()))
    };
    let config = repo
        .get("config.json")
        .map_err(|e| fetch_err("config.json", e))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| EngineError::NotFound(not_cached()))?;
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| EngineError::io_path("reading", &index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Weight(format!("bad index JSON: {e}")))?;
            let mut shards: Vec<&str> = json["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard).map_err(|e| fetch_err(shard, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| fetch_err("model.safetensors", e))?;
        }
    }
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config_sentence_transformers.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        let _ = repo.get(optional);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("BAAI/bge-reranker-base"));
        assert!(looks_like_repo_id("jason9693/Qwen2.5-1.5B-apeach"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("plain"));
        assert!(!looks_like_repo_id("/abs/path"));
    }

    #[test]
    fn finds_snapshot_through_refs() {
        let tmp = std::env::temp_dir().join(format!("verdict-cache-{}", std::process::id()));
        let repo = tmp.join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(
            find_in_hf_cache(&tmp, "org/tiny", "main"),
            Some(snap.clone())
        );
        assert_eq!(find_in_hf_cache(&tmp, "org/tiny", "abc123"), Some(snap));
        assert_eq!(find_in_hf_cache(&tmp, "org/tiny", "v2"), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
