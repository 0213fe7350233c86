use serde::Deserialize;

use crate::error::{EngineError, Result};

/// How hidden states become the rows a head sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PoolingType {
    /// The first token of each sequence.
    Cls,
    /// The last token of each sequence.
    Last,
    /// The fp32 mean over each sequence's tokens.
    Mean,
    /// Every token (token classification).
    All,
    /// Every token whose id is the step tag, optionally restricted to some
    /// output columns (process reward models).
    Step,
}

impl std::str::FromStr for PoolingType {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "CLS" => Ok(PoolingType::Cls),
            "LAST" => Ok(PoolingType::Last),
            "MEAN" => Ok(PoolingType::Mean),
            "ALL" => Ok(PoolingType::All),
            "STEP" => Ok(PoolingType::Step),
            _ => Err(EngineError::Config(format!(
                "unknown pooling type `{s}` (expected CLS, LAST, MEAN, ALL or STEP)"
            ))),
        }
    }
}

/// vLLM's pooling tasks. verdict serves `classify` and `token_classify`; the
/// others are recognised so requests for them get vLLM's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolingTask {
    Classify,
    TokenClassify,
    Embed,
    TokenEmbed,
    Plugin,
    EmbedAndTokenClassify,
}

impl PoolingTask {
    pub fn as_str(&self) -> &'static str {
        match self {
            PoolingTask::Classify => "classify",
            PoolingTask::TokenClassify => "token_classify",
            PoolingTask::Embed => "embed",
            PoolingTask::TokenEmbed => "token_embed",
            PoolingTask::Plugin => "plugin",
            PoolingTask::EmbedAndTokenClassify => "embed&token_classify",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "classify" => PoolingTask::Classify,
            "token_classify" => PoolingTask::TokenClassify,
            "embed" => PoolingTask::Embed,
            "token_embed" => PoolingTask::TokenEmbed,
            "plugin" => PoolingTask::Plugin,
            "embed&token_classify" => PoolingTask::EmbedAndTokenClassify,
            _ => return None,
        })
    }
}

impl std::fmt::Display for PoolingTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--pooler-config`: server-wide pooling defaults (vLLM's PoolerConfig).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolerConfig {
    pub task: Option<PoolingTask>,
    pub seq_pooling_type: Option<PoolingType>,
    pub tok_pooling_type: Option<PoolingType>,
    pub use_activation: Option<bool>,
    pub logit_mean: Option<f64>,
    pub logit_sigma: Option<f64>,
    /// STEP pooling: keep only the rows of this token id.
    pub step_tag_id: Option<u32>,
    /// STEP pooling: keep only these output columns.
    pub returned_token_ids: Option<Vec<u32>>,
}

impl PoolerConfig {
    /// The configured per-request STEP defaults.
    pub fn step_params(&self) -> StepParams {
        StepParams {
            step_tag_id: self.step_tag_id,
            returned_token_ids: self.returned_token_ids.clone(),
        }
    }
}

/// STEP pooling parameters (vLLM's `step_tag_id` / `returned_token_ids`),
/// per request or as server defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepParams {
    pub step_tag_id: Option<u32>,
    pub returned_token_ids: Option<Vec<u32>>,
}

impl StepParams {
    pub fn is_empty(&self) -> bool {
        self.step_tag_id.is_none() && self.returned_token_ids.is_none()
    }

    /// The request's values, falling back to `defaults` for those it leaves out.
    pub fn or(&self, defaults: &StepParams) -> StepParams {
        StepParams {
            step_tag_id: self.step_tag_id.or(defaults.step_tag_id),
            returned_token_ids: self
                .returned_token_ids
                .clone()
                .or_else(|| defaults.returned_token_ids.clone()),
        }
    }

    /// The names of the parameters that are set, as vLLM lists them.
    pub fn set_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.step_tag_id.is_some() {
            names.push("step_tag_id");
        }
        if self.returned_token_ids.is_some() {
            names.push("returned_token_ids");
        }
        names
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoolerConfig {
    task: Option<String>,
    pooling_type: Option<String>,
    seq_pooling_type: Option<String>,
    tok_pooling_type: Option<String>,
    use_activation: Option<bool>,
    logit_mean: Option<f64>,
    logit_sigma: Option<f64>,
    logit_bias: Option<f64>,
    logit_scale: Option<f64>,
    // Accepted for compatibility; they only affect embedding models.
    dimensions: Option<serde_json::Value>,
    enable_chunked_processing: Option<bool>,
    max_embed_len: Option<serde_json::Value>,
    step_tag_id: Option<u32>,
    returned_token_ids: Option<Vec<u32>>,
    normalize: Option<bool>,
    softmax: Option<bool>,
    activation: Option<bool>,
}

impl PoolerConfig {
    /// Parses the JSON form of `--pooler-config`, with vLLM's checks.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let raw: RawPoolerConfig = serde_json::from_value(value.clone())
            .map_err(|e| EngineError::Config(format!("--pooler-config: {e}")))?;
        let task = match raw.task.as_deref() {
            None => None,
            Some(t) => Some(PoolingTask::parse(t).ok_or_else(|| {
                EngineError::Config(format!("--pooler-config: unknown task `{t}`"))
            })?),
        };
        let parse_type = |v: &Option<String>| -> Result<Option<PoolingType>> {
            v.as_deref().map(str::parse).transpose()
        };
        let mut seq = parse_type(&raw.seq_pooling_type)?;
        let mut tok = parse_type(&raw.tok_pooling_type)?;
        if let Some(p) = parse_type(&raw.pooling_type)? {
            if matches!(p, PoolingType::All | PoolingType::Step) {
                if tok.is_some() {
                    return Err(EngineError::Config(
                        "Cannot set both `pooling_type` and `tok_pooling_type`".into(),
                    ));
                }
                tok = Some(p);
            } else {
                if seq.is_some() {
                    return Err(EngineError::Config(
                        "Cannot set both `pooling_type` and `seq_pooling_type`".into(),
                    ));
                }
                seq = Some(p);
            }
        }
        if matches!(seq, Some(PoolingType::All | PoolingType::Step)) {
            return Err(EngineError::Config(
                "seq_pooling_type must be CLS, LAST or MEAN".into(),
            ));
        }
        if matches!(
            tok,
            Some(PoolingType::Cls | PoolingType::Last | PoolingType::Mean)
        ) {
            return Err(EngineError::Config(
                "tok_pooling_type must be ALL or STEP".into(),
            ));
        }
        if raw.logit_bias.is_some() && raw.logit_mean.is_some() {
            return Err(EngineError::Config(
                "Cannot set both `logit_bias` and `logit_mean`. `logit_bias` is deprecated; use `logit_mean`.".into(),
            ));
        }
        if raw.logit_scale.is_some() && raw.logit_sigma.is_some() {
            return Err(EngineError::Config(
                "Cannot set both `logit_scale` and `logit_sigma`. `logit_scale` is deprecated; use `logit_sigma`.".into(),
            ));
        }
        if raw.logit_sigma == Some(0.0) {
            return Err(EngineError::Config(
                "logit_sigma cannot be 0 (division by zero)".into(),
            ));
        }
        if raw.logit_sigma.is_none() && raw.logit_scale == Some(0.0) {
            return Err(EngineError::Config(
                "logit_scale cannot be 0 (division by zero)".into(),
            ));
        }
        let logit_sigma = raw.logit_sigma.or(raw.logit_scale.map(|scale| 1.0 / scale));
        let legacy_activation = raw.softmax.or(raw.activation).or(raw.normalize);
        let _ = (
            raw.dimensions,
            raw.enable_chunked_processing,
            raw.max_embed_len,
        );
        Ok(PoolerConfig {
            task,
            seq_pooling_type: seq,
            tok_pooling_type: tok,
            use_activation: raw.use_activation.or(legacy_activation),
            logit_mean: raw.logit_mean.or(raw.logit_bias),
            logit_sigma,
            step_tag_id: raw.step_tag_id,
            returned_token_ids: raw.returned_token_ids,
        })
    }

    /// Parses `--pooler-config` text: a JSON object.
    pub fn from_str_arg(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("--pooler-config is not valid JSON: {e}")))?;
        Self::from_json(&value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_checks() {
        let c = PoolerConfig::from_json(&json!({"task":"token_classify","pooling_type":"mean","logit_bias":4.5,"logit_scale":0.5})).unwrap();
        assert_eq!(c.task, Some(PoolingTask::TokenClassify));
        assert_eq!(c.seq_pooling_type, Some(PoolingType::Mean));
        assert_eq!(c.logit_mean, Some(4.5));
        assert_eq!(c.logit_sigma, Some(2.0));
        assert!(PoolerConfig::from_json(&json!({"logit_sigma":0.0})).is_err());
        assert!(
            PoolerConfig::from_json(&json!({"pooling_type":"CLS","seq_pooling_type":"LAST"}))
                .is_err()
        );
        assert!(PoolerConfig::from_json(&json!({"bogus":1})).is_err());
    }

    #[test]
    fn step_pooling_is_a_token_pooling() {
        let c = PoolerConfig::from_json(
            &json!({"pooling_type":"STEP","step_tag_id":12902,"returned_token_ids":[648,387]}),
        )
        .unwrap();
        assert_eq!(c.tok_pooling_type, Some(PoolingType::Step));
        assert_eq!(c.seq_pooling_type, None);
        assert_eq!(c.step_tag_id, Some(12902));
        assert_eq!(c.returned_token_ids, Some(vec![648, 387]));
        assert!(PoolerConfig::from_json(&json!({"seq_pooling_type":"STEP"})).is_err());
        assert!(PoolerConfig::from_json(&json!({"tok_pooling_type":"LAST"})).is_err());
        assert!(PoolerConfig::from_json(&json!({"step_tag_id":-1})).is_err());
        let request = StepParams {
            step_tag_id: None,
            returned_token_ids: Some(vec![1]),
        };
        let merged = request.or(&c.step_params());
        assert_eq!(merged.step_tag_id, Some(12902));
        assert_eq!(merged.returned_token_ids, Some(vec![1]));
    }
}
