//! What every handler shares, and the JSON body extractor.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use verdict_engine::lora::LoraRef;
use verdict_engine::{Engine, ModelInfo};

use crate::error::{ApiError, SchemaIssue};
use crate::execution::TokenizerPool;
use crate::fields::Body;
use crate::metrics::ServerMetrics;
use crate::middleware::BodyDeadline;
use crate::ServerConfig;

pub struct AppState {
    pub engine: Arc<Engine>,
    pub info: Arc<ModelInfo>,
    pub config: ServerConfig,
    pub metrics: Arc<ServerMetrics>,
    pub tokenizers: TokenizerPool,
    /// Fetches and decodes media (multimodal models only).
    pub media: Option<TokenizerPool>,
}

pub type SharedState = Arc<AppState>;

/// The model a request runs on: the base model, or one of its LoRA adapters.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Echoed as the response's `model`.
    pub name: String,
    pub lora: Option<LoraRef>,
}

impl Selection {
    /// The label of the highest value, from the adapter's labels when it has a head.
    pub fn label_of(&self, info: &ModelInfo, probs: &[f32]) -> Option<String> {
        match &self.lora {
            Some(adapter) => adapter.info().label_of(probs),
            None => info.label_of(probs),
        }
    }

    pub fn num_labels(&self, info: &ModelInfo) -> usize {
        match &self.lora {
            Some(adapter) => adapter.info().num_labels,
            None => info.num_labels,
        }
    }
}

impl AppState {
    /// The base model when `model` is absent or one of the served names, a LoRA
    /// adapter by its name, else 404.
    pub fn check_model(&self, model: Option<&str>) -> Result<Selection, ApiError> {
        let base = || Selection {
            name: self.served_name().to_string(),
            lora: None,
        };
        let Some(name) = model else {
            return Ok(base());
        };
        if self.info.served_model_names.iter().any(|n| n == name) {
            return Ok(base());
        }
        match self.engine.lora().and_then(|registry| registry.get(name)) {
            Some(adapter) => Ok(Selection {
                name: name.to_string(),
                lora: Some(LoraRef(adapter)),
            }),
            None => Err(ApiError::model_not_found(name)),
        }
    }

    pub fn served_name(&self) -> &str {
        self.info.served_name()
    }
}

/// Response id: `<prefix><X-Request-Id>` when the header is sent, else 16 random hex digits.
pub fn response_id(prefix: &str, headers: &HeaderMap) -> String {
    match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) => format!("{prefix}{id}"),
        None => format!("{prefix}{}", random_hex16()),
    }
}

pub fn random_hex16() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub fn random_hex32() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A POST body that must be `application/json` holding a JSON object.
pub struct JsonBody(pub Body);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let media_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if media_type != "application/json" {
            return Err(ApiError::schema(
                "Unsupported Media Type: Only 'application/json' is allowed",
            ));
        }
        let deadline = req.extensions().get::<BodyDeadline>().copied();
        let read = Bytes::from_request(req, state);
        let read = match deadline {
            Some(BodyDeadline(until)) => {
                tokio::time::timeout_at(until, read).await.map_err(|_| {
                    ApiError::http(
                        StatusCode::REQUEST_TIMEOUT,
                        "The request body did not arrive in time (--body-read-timeout).",
                    )
                })?
            }
            None => read.await,
        };
        let bytes = read.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::http(
                    status,
                    "The request body is larger than the server's limit (--max-request-body-bytes).",
                )
            } else {
                ApiError::http(status, rejection.body_text())
            }
        })?;
        // Parsing a multi-megabyte body takes milliseconds: keep it off the async workers.
        const INLINE_PARSE_BYTES: usize = 256 * 1024;
        let parsed = if bytes.len() > INLINE_PARSE_BYTES {
            tokio::task::spawn_blocking(move || serde_json::from_slice::<Value>(&bytes))
                .await
                .map_err(|e| ApiError::internal(format!("parsing the request body: {e}")))?
        } else {
            serde_json::from_slice::<Value>(&bytes)
        };
        match parsed {
            Ok(Value::Object(fields)) => Ok(JsonBody(Body::new(fields))),
            Ok(other) => Err(SchemaIssue::new(
                "model_attributes_type",
                &[],
                "Input should be a valid dictionary or object to extract fields from",
            )
            .with_input(&other)
            .into()),
            Err(e) => {
                Err(SchemaIssue::new("json_invalid", &[], format!("JSON decode error: {e}")).into())
            }
        }
    }
}
