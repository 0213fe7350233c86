use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// A Hugging Face `config.json` after `--hf-overrides` are merged in.
#[derive(Debug, Clone)]
pub struct HfConfig {
    raw: Value,
}

/// Recursively merges `overrides` into `base` (objects merge key by key, anything else replaces).
pub fn merge_json(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_json(existing, v)
                    }
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

impl HfConfig {
    pub fn load(path: &Path, overrides: Option<&Value>) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| EngineError::io_path("reading", path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::Config(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        Self::from_value(raw, overrides)
    }

    pub fn from_value(mut raw: Value, overrides: Option<&Value>) -> Result<Self> {
        if !raw.is_object() {
            return Err(EngineError::Config(
                "config.json must be a JSON object".into(),
            ));
        }
        if let Some(o) = overrides {
            if !o.is_object() {
                return Err(EngineError::Config(
                    "--hf-overrides must be a JSON object".into(),
                ));
            }
            merge_json(&mut raw, o);
            // transformers regenerates id2label when num_labels changes without one.
            if let Some(n) = o.get("num_labels").and_then(Value::as_u64) {
                if o.get("id2label").is_none() {
                    let labels_len = raw
                        .get("id2label")
                        .and_then(Value::as_object)
                        .map(|m| m.len() as u64);
                    if labels_len != Some(n) {
                        raw["id2label"] = default_id2label(n as usize);
                    }
                }
            }
        }
        Ok(HfConfig { raw })
    }

    pub fn raw(&self) -> &Value {
        &self.raw
    }

    pub fn raw_mut(&mut self) -> &mut Value {
        &mut self.raw
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    /// Looks a key up at the top level, then in `text_config` (multimodal configs).
    pub fn get_with_text(&self, key: &str) -> Option<&Value> {
        self.get(key).or_else(|| {
            self.raw
                .get("text_config")
                .and_then(|t| t.get(key))
                .filter(|v| !v.is_null())
        })
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(Value::as_u64).map(|v| v as usize)
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    /// Deserialises the whole config into a model's typed config struct.
    pub fn parse<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        serde_json::from_value(self.raw.clone())
            .map_err(|e| EngineError::Config(format!("{what} config: {e}")))
    }

    pub fn architectures(&self) -> Vec<String> {
        self.get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn model_type(&self) -> Option<&str> {
        self.str("model_type")
    }

    /// `id2label` as transformers would expose it (`LABEL_i` when the config
    /// has none); `None` when keys are not integers.
    pub fn id2label(&self) -> Option<BTreeMap<usize, String>> {
        let Some(map) = self.get("id2label") else {
            return Some(
                (0..self.num_labels())
                    .map(|i| (i, format!("LABEL_{i}")))
                    .collect(),
            );
        };
        let map = map.as_object()?;
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let id: usize = k.parse().ok()?;
            out.insert(id, v.as_str()?.to_string());
        }
        Some(out)
    }

    /// num_labels as transformers derives it: the size of id2label, else
    /// `num_labels`, else 2.
    pub fn num_labels(&self) -> usize {
        if let Some(m) = self.get("id2label").and_then(Value::as_object) {
            return m.len();
        }
        self.usize("num_labels").unwrap_or(2)
    }

    pub fn problem_type(&self) -> Option<&str> {
        self.str("problem_type")
    }

    /// The sentence-transformers cross-encoder activation, if the config names one.
    pub fn sentence_transformers_activation(&self) -> Option<String> {
        self.raw
            .get("sentence_transformers")
            .and_then(|s| s.get("activation_fn"))
            .and_then(Value::as_str)
            .or_else(|| self.str("sbert_ce_default_activation_function"))
            .map(str::to_owned)
    }

    /// Forces a label count (LLM-as-reranker conversion), resetting the label names.
    pub fn set_num_labels(&mut self, n: usize) {
        self.raw["num_labels"] = Value::from(n);
        self.raw["id2label"] = default_id2label(n);
    }
}

fn default_id2label(n: usize) -> Value {
    let mut m = serde_json::Map::new();
    for i in 0..n {
        m.insert(i.to_string(), Value::from(format!("LABEL_{i}")));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overrides_merge_and_relabel() {
        let cfg = HfConfig::from_value(
            json!({"architectures":["A"],"id2label":{"0":"x","1":"y"},"text_config":{"a":1,"b":2}}),
            Some(&json!({"num_labels":3,"text_config":{"b":5}})),
        )
        .unwrap();
        assert_eq!(cfg.num_labels(), 3);
        assert_eq!(cfg.id2label().unwrap()[&2], "LABEL_2");
        assert_eq!(cfg.raw()["text_config"], json!({"a":1,"b":5}));
    }

    #[test]
    fn num_labels_defaults() {
        let cfg = HfConfig::from_value(json!({}), None).unwrap();
        assert_eq!(cfg.num_labels(), 2);
        let cfg = HfConfig::from_value(json!({"num_labels": 1}), None).unwrap();
        assert_eq!(cfg.num_labels(), 1);
    }
}
