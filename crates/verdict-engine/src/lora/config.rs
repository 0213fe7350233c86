//! `adapter_config.json`: what a PEFT LoRA adapter declares, and what verdict refuses.

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Which modules an adapter adapts, as PEFT matches them.
#[derive(Debug, Clone)]
pub enum TargetModules {
    /// Module names: a module matches when its name is one of them or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression the whole module name must match.
    Pattern(Regex),
    /// PEFT's `all-linear`: every linear layer of the backbone.
    AllLinear,
}

impl TargetModules {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|n| suffix_match(module, n)),
            TargetModules::Pattern(re) => re.is_match(module),
            TargetModules::AllLinear => true,
        }
    }
}

/// PEFT's rule for a listed name: the module itself or a `.`-separated suffix of it.
fn suffix_match(module: &str, name: &str) -> bool {
    module == name
        || module
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('.'))
}

/// The parts of `adapter_config.json` that decide the low-rank update.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub modules_to_save: Vec<String>,
    /// `alpha_pattern`: per-module alphas, first matching key wins (as PEFT).
    alpha_pattern: Vec<(Regex, f64)>,
}

impl AdapterConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::io_path("reading LoRA config", path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::Config(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        Self::from_json(&json).map_err(|e| match e {
            EngineError::Config(msg) => EngineError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_json(json: &Value) -> Result<Self> {
        let refuse = |msg: String| Err(EngineError::Config(msg));
        if let Some(kind) = json.get("peft_type").and_then(Value::as_str) {
            if kind != "LORA" {
                return refuse(format!(
                    "peft_type `{kind}` is not supported (only LORA adapters)"
                ));
            }
        }
        if json.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return refuse("DoRA adapters (use_dora: true) are not supported".into());
        }
        match json.get("bias").and_then(Value::as_str).unwrap_or("none") {
            "none" => {}
            other => {
                return refuse(format!(
                    "bias `{other}` is not supported: only adapters trained with bias \"none\" \
                     (bias \"all\" / \"lora_only\" change the base model's biases)"
                ))
            }
        }
        if json.get("lora_bias").and_then(Value::as_bool) == Some(true) {
            return refuse("lora_bias: true is not supported".into());
        }
        if json.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return refuse("fan_in_fan_out: true (GPT-2 Conv1D targets) is not supported".into());
        }
        if json
            .get("layers_to_transform")
            .is_some_and(|v| !v.is_null())
        {
            return refuse("layers_to_transform is not supported".into());
        }
        let rank = json
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| EngineError::Config("`r` must be a positive integer".into()))?
            as usize;
        let alpha = match json.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| EngineError::Config("`lora_alpha` must be a number".into()))?,
        };
        let target_modules = match json.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => {
                TargetModules::Pattern(Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    EngineError::Config(format!("target_modules `{s}` is not a valid regex: {e}"))
                })?)
            }
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| {
                            EngineError::Config("target_modules must list strings".into())
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => {
                return refuse(
                    "target_modules must be a list of module names or a regex string".into(),
                )
            }
        };
        let modules_to_save = match json.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => return refuse("modules_to_save must be a list of module names".into()),
        };
        let mut alpha_pattern = Vec::new();
        if let Some(map) = json.get("alpha_pattern").and_then(Value::as_object) {
            for (key, v) in map {
                let a = v.as_f64().ok_or_else(|| {
                    EngineError::Config(format!("alpha_pattern `{key}` must be a number"))
                })?;
                alpha_pattern.push((key_pattern(key)?, a));
            }
        }
        Ok(AdapterConfig {
            rank,
            alpha,
            use_rslora: json.get("use_rslora").and_then(Value::as_bool) == Some(true),
            target_modules,
            modules_to_save,
            alpha_pattern,
        })
    }

    /// The factor a module's `B A` is multiplied by: `alpha / r`, or `alpha / sqrt(r)`
    /// with rsLoRA; `rank` is the module's own (`rank_pattern` shows in its shapes).
    pub fn scaling(&self, module: &str, rank: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.alpha, |(_, a)| *a);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// PEFT's pattern-key rule: the key names the module or a `.`-separated suffix, as a regex.
fn key_pattern(key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| EngineError::Config(format!("pattern key `{key}` is not a valid regex: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<AdapterConfig> {
        AdapterConfig::from_json(&v)
    }

    #[test]
    fn names_match_whole_suffixes_only() {
        let cfg = parse(json!({"r": 4, "target_modules": ["query", "v_proj"]})).unwrap();
        assert!(cfg
            .target_modules
            .matches("bert.encoder.layer.0.attention.self.query"));
        assert!(cfg
            .target_modules
            .matches("model.layers.1.self_attn.v_proj"));
        assert!(!cfg
            .target_modules
            .matches("model.layers.1.self_attn.xv_proj"));
        assert!(!cfg
            .target_modules
            .matches("bert.encoder.layer.0.attention.self.key"));
    }

    #[test]
    fn a_string_is_a_full_match_regex_or_all_linear() {
        let cfg = parse(json!({"r": 4, "target_modules": r".*\.(q|k)_proj"})).unwrap();
        assert!(cfg
            .target_modules
            .matches("model.layers.0.self_attn.q_proj"));
        assert!(!cfg
            .target_modules
            .matches("model.layers.0.self_attn.q_proj.x"));
        let cfg = parse(json!({"r": 4, "target_modules": "all-linear"})).unwrap();
        assert!(matches!(cfg.target_modules, TargetModules::AllLinear));
    }

    #[test]
    fn scaling_follows_rslora_and_alpha_pattern() {
        let cfg = parse(json!({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj"]})).unwrap();
        assert_eq!(cfg.scaling("a.q_proj", 4), 4.0);
        let cfg = parse(json!({"r": 4, "lora_alpha": 16, "use_rslora": true,
            "target_modules": ["q_proj"], "alpha_pattern": {"layers.1.self_attn.q_proj": 2}}))
        .unwrap();
        assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 4), 8.0);
        assert_eq!(cfg.scaling("model.layers.1.self_attn.q_proj", 4), 1.0);
    }

    #[test]
    fn unsupported_variants_are_refused_clearly() {
        for (cfg, needle) in [
            (
                json!({"r": 4, "target_modules": ["q"], "use_dora": true}),
                "DoRA",
            ),
            (
                json!({"r": 4, "target_modules": ["q"], "bias": "all"}),
                "bias `all`",
            ),
            (
                json!({"r": 4, "target_modules": ["q"], "bias": "lora_only"}),
                "lora_only",
            ),
            (
                json!({"r": 4, "target_modules": ["q"], "peft_type": "IA3"}),
                "IA3",
            ),
            (json!({"r": 0, "target_modules": ["q"]}), "`r`"),
            (json!({"r": 4}), "target_modules"),
            (json!({"r": 4, "target_modules": "("}), "regex"),
        ] {
            let msg = parse(cfg).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    }
}
