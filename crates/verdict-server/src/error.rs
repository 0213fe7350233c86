//! vLLM's error envelope `{"error":{"message","type","param","code"}}` and the
//! mapping of every failure onto it (spec §6.8).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use verdict_engine::EngineError;

/// An error answer. `kind` is the envelope's `type`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds for the `Retry-After` header (overload refusals).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// Adds `Retry-After: <seconds>` to the answer.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The body failed schema validation (vLLM: FastAPI's `RequestValidationError`).
    pub fn schema(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", message)
    }

    /// The request is well-formed but cannot be served (vLLM: a `ValueError` in the handler).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequestError", message)
    }

    pub fn bad_request_param(message: impl Into<String>, param: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..Self::bad_request(message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{model}` does not exist."),
        )
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "NotImplementedError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            message,
        )
    }

    /// An HTTP-level refusal (e.g. 413) in the envelope, typed by its reason phrase.
    pub fn http(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(
            status,
            status.canonical_reason().unwrap_or("Error"),
            message,
        )
    }

    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Validation { message, param } => ApiError {
                param,
                ..ApiError::bad_request(message)
            },
            EngineError::Template(_) | EngineError::Tokenizer(_) => {
                ApiError::bad_request(e.to_string())
            }
            EngineError::NotImplemented(m) => ApiError::not_implemented(m),
            EngineError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "NotFoundError", m),
            EngineError::Unavailable(m) => ApiError::unavailable(m).with_retry_after(1),
            other => {
                tracing::error!(error = %other, "engine failure");
                ApiError::internal(other.to_string())
            }
        }
    }
}

/// An error's message, kept on the response for the request log line.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(ErrorMessage(self.message));
        response
    }
}

/// Starlette's answer for a path no route matches.
pub fn not_found_detail() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

/// Starlette's answer for a known path with the wrong method.
pub fn method_not_allowed_detail() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({"detail": "Method Not Allowed"})),
    )
        .into_response()
}

/// One entry of a pydantic-style validation error, rendered the way vLLM's
/// message shows them: `[{'type': ..., 'loc': ('body', ...), 'msg': ..., 'input': ...}]`.
#[derive(Debug, Clone)]
pub struct SchemaIssue {
    pub kind: &'static str,
    pub loc: Vec<String>,
    pub msg: String,
    pub input: Option<Value>,
}

impl SchemaIssue {
    pub fn new(kind: &'static str, loc: &[&str], msg: impl Into<String>) -> Self {
        SchemaIssue {
            kind,
            loc: loc.iter().map(|s| s.to_string()).collect(),
            msg: msg.into(),
            input: None,
        }
    }

    pub fn with_input(mut self, input: &Value) -> Self {
        self.input = Some(input.clone());
        self
    }

    fn render(&self) -> String {
        let mut loc = String::from("('body'");
        for part in &self.loc {
            loc.push_str(", ");
            loc.push_str(&py_str(part));
        }
        if self.loc.is_empty() {
            loc.push(',');
        }
        loc.push(')');
        let mut out = format!(
            "{{'type': '{}', 'loc': {loc}, 'msg': {}",
            self.kind,
            py_str(&self.msg)
        );
        if let Some(input) = &self.input {
            out.push_str(", 'input': ");
            out.push_str(&py_repr(input));
        }
        out.push('}');
        out
    }
}

impl From<SchemaIssue> for ApiError {
    fn from(issue: SchemaIssue) -> Self {
        ApiError::schema(format!("[{}]", issue.render()))
    }
}

/// Python's `repr()` of a string: single quotes unless the text holds one and no double quote.
fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr()` of a JSON value, shortened for large inputs.
fn py_repr(v: &Value) -> String {
    const MAX: usize = 200;
    let text = match v {
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
    };
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_issue_renders_like_pydantic() {
        let e: ApiError = SchemaIssue::new(
            "literal_error",
            &["encoding_format"],
            "Input should be 'float' or 'base64'",
        )
        .with_input(&json!("xyz"))
        .into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.kind, "Bad Request");
        assert_eq!(
            e.message,
            "[{'type': 'literal_error', 'loc': ('body', 'encoding_format'), 'msg': \"Input should be 'float' or 'base64'\", 'input': 'xyz'}]"
        );
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let e = ApiError::from(EngineError::validation_param("too long", "input_tokens"));
        assert_eq!(
            (e.status, e.kind, e.param.as_deref()),
            (
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                Some("input_tokens")
            )
        );
        let e = ApiError::from(EngineError::Unavailable("full".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(EngineError::Config("x".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
