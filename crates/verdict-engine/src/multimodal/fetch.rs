//! Media URLs to bytes, with vLLM's media policy: `data:` URLs (base64),
//! `http(s)://` (optionally only from `--allowed-media-domains`) and `file://`
//! (only under `--allowed-local-media-path`). Every failure is the request's
//! fault: `EngineError::Validation`.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::MediaPolicy;
use crate::error::{EngineError, Result};

/// Redirects followed for http(s) URLs (each hop is checked against the policy).
const MAX_REDIRECTS: usize = 5;

pub fn fetch_media(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let url = url.trim();
    let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower.starts_with("data:") {
        data_url(url, policy)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        http(url, policy)
    } else if lower.starts_with("file:") {
        local_file(url, policy)
    } else {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        Err(EngineError::validation(format!(
            "unsupported media URL scheme {scheme:?}: use http://, https://, data: or file:// URLs"
        )))
    }
}

fn too_large(max: usize) -> EngineError {
    EngineError::validation(format!("media is too large (limit {max} bytes)"))
}

fn data_url(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let rest = &url[5..];
    let (header, payload) = rest.split_once(',').ok_or_else(|| {
        EngineError::validation("malformed data URL: expected data:<mime>;base64,<data>")
    })?;
    let is_base64 = header
        .rsplit(';')
        .next()
        .is_some_and(|enc| enc.trim().eq_ignore_ascii_case("base64"));
    if !is_base64 {
        return Err(EngineError::validation(
            "only base64 data URLs are supported (data:<mime>;base64,<data>)",
        ));
    }
    let cleaned: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if cleaned.len() / 4 * 3 > policy.max_bytes.saturating_add(3) {
        return Err(too_large(policy.max_bytes));
    }
    let lenient = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let standard = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, lenient);
    let url_safe = base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient);
    let bytes = standard
        .decode(&cleaned)
        .or_else(|e| url_safe.decode(&cleaned).map_err(|_| e))
        .map_err(|e| EngineError::validation(format!("invalid base64 in data URL: {e}")))?;
    if bytes.len() > policy.max_bytes {
        return Err(too_large(policy.max_bytes));
    }
    Ok(bytes)
}

fn check_domain(url: &url::Url, policy: &MediaPolicy) -> Result<()> {
    let Some(allowed) = &policy.allowed_domains else {
        return Ok(());
    };
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let ok = allowed.iter().any(|d| {
        d.trim()
            .trim_end_matches('.')
            .trim_start_matches('[')
            .trim_end_matches(']')
            .eq_ignore_ascii_case(&host)
    });
    if ok {
        Ok(())
    } else {
        Err(EngineError::validation(format!(
            "the media URL's domain {host:?} is not allowed (allowed domains: {})",
            allowed.join(", ")
        )))
    }
}

fn http(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let agent = ureq::AgentBuilder::new()
        .timeout(policy.timeout)
        .redirects(0)
        .build();
    let mut current = url::Url::parse(url)
        .map_err(|e| EngineError::validation(format!("invalid media URL {url:?}: {e}")))?;
    for _ in 0..=MAX_REDIRECTS {
        if !matches!(current.scheme(), "http" | "https") {
            return Err(EngineError::validation(format!(
                "fetching {url} failed: redirected to a non-http URL"
            )));
        }
        if current.host_str().is_none_or(str::is_empty) {
            return Err(EngineError::validation(format!(
                "invalid media URL {url:?}: no host"
            )));
        }
        check_domain(&current, policy)?;
        let response = match agent.request_url("GET", &current).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => {
                return Err(EngineError::validation(format!(
                    "fetching {url} failed with status {code}"
                )))
            }
            Err(e) => {
                return Err(EngineError::validation(format!(
                    "fetching {url} failed: {e}"
                )))
            }
        };
        let status = response.status();
        if (300..400).contains(&status) {
            let location = response.header("location").ok_or_else(|| {
                EngineError::validation(format!(
                    "fetching {url} failed with status {status} (no Location)"
                ))
            })?;
            current = current.join(location).map_err(|e| {
                EngineError::validation(format!("fetching {url} failed: bad redirect: {e}"))
            })?;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(EngineError::validation(format!(
                "fetching {url} failed with status {status}"
            )));
        }
        if let Some(len) = response
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len > policy.max_bytes as u64 {
                return Err(too_large(policy.max_bytes));
            }
        }
        let mut body = Vec::new();
        response
            .into_reader()
            .take(policy.max_bytes as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| EngineError::validation(format!("fetching {url} failed: {e}")))?;
        if body.len() > policy.max_bytes {
            return Err(too_large(policy.max_bytes));
        }
        return Ok(body);
    }
    Err(EngineError::validation(format!(
        "fetching {url} failed: more than {MAX_REDIRECTS} redirects"
    )))
}

fn local_file(url: &str, policy: &MediaPolicy) -> Result<Vec<u8>> {
    let Some(root) = &policy.allowed_local_path else {
        return Err(EngineError::validation(
            "local files (file:// URLs) are not allowed: the server was started without --allowed-local-media-path",
        ));
    };
    let parsed = url::Url::parse(url)
        .map_err(|e| EngineError::validation(format!("invalid file URL {url:?}: {e}")))?;
    if parsed
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(EngineError::validation(format!(
            "file URL {url:?} names a remote host"
        )));
    }
    let path: PathBuf = parsed
        .to_file_path()
        .map_err(|()| EngineError::validation(format!("invalid file URL {url:?}")))?;
    let not_allowed = || {
        EngineError::validation(format!(
            "the file {} is not under the allowed local media path",
            path.display()
        ))
    };
    let root = root.canonicalize().map_err(|_| not_allowed())?;
    // Canonicalising resolves `..` and symlinks; a missing file reads as not allowed
    // rather than telling the client what exists outside the allowed folder.
    let real = path.canonicalize().map_err(|_| {
        if lexically_under(&path, &root) {
            EngineError::validation(format!("the file {} does not exist", path.display()))
        } else {
            not_allowed()
        }
    })?;
    if !real.starts_with(&root) {
        return Err(not_allowed());
    }
    let meta = std::fs::metadata(&real)
        .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(EngineError::validation(format!(
            "{} is not a file",
            path.display()
        )));
    }
    if meta.len() > policy.max_bytes as u64 {
        return Err(too_large(policy.max_bytes));
    }
    std::fs::read(&real)
        .map_err(|e| EngineError::validation(format!("cannot read {}: {e}", path.display())))
}

/// `path` is under `root` without following anything (no `..` components).
fn lexically_under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls() {
        let p = MediaPolicy::default();
        assert_eq!(
            fetch_media("data:image/png;base64,aGVsbG8=", &p).unwrap(),
            b"hello"
        );
        assert_eq!(
            fetch_media("data:image/png;base64,aGVsbG8", &p).unwrap(),
            b"hello"
        );
        let e = fetch_media("data:image/png;base64,@@@@", &p).unwrap_err();
        assert!(e.to_string().contains("invalid base64"), "{e}");
        let e = fetch_media("data:image/png,hello", &p).unwrap_err();
        assert!(e.to_string().contains("only base64"), "{e}");
        let small = MediaPolicy {
            max_bytes: 3,
            ..MediaPolicy::default()
        };
        let e = fetch_media("data:image/png;base64,aGVsbG8=", &small).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn schemes_and_domains() {
        let p = MediaPolicy {
            allowed_domains: Some(vec!["example.org".into()]),
            ..MediaPolicy::default()
        };
        let e = fetch_media("ftp://example.org/a.png", &p).unwrap_err();
        assert!(
            e.to_string().contains("unsupported media URL scheme"),
            "{e}"
        );
        let e = fetch_media("https://evil.test/a.png", &p).unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
        let e = fetch_media("file:///etc/passwd", &MediaPolicy::default()).unwrap_err();
        assert!(e.to_string().contains("--allowed-local-media-path"), "{e}");
    }
}
