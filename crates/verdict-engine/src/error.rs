//! Engine errors. The server maps each variant once to vLLM's error envelope.

use std::path::PathBuf;

/// Everything the engine can fail with. `Validation` is the request's fault
/// (HTTP 400); the others are load-time or internal failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad input from a request: the message is what the client sees.
    #[error("{message}")]
    Validation {
        message: String,
        /// The request field at fault, when one is.
        param: Option<String>,
    },
    /// The request asks for something this model does not offer (HTTP 501 on the server).
    #[error("{0}")]
    NotImplemented(String),
    /// A model or file the caller named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The engine is shutting down or its queue is full (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The checkpoint's config cannot be used.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A weight is missing, mis-shaped or unreadable.
    #[error("{0}")]
    Weight(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn validation(message: impl Into<String>) -> Self {
        EngineError::Validation {
            message: message.into(),
            param: None,
        }
    }

    pub fn validation_param(message: impl Into<String>, param: impl Into<String>) -> Self {
        EngineError::Validation {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn io_path(what: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        EngineError::io(format!("{what} {}", path.display()), source)
    }

    /// True when the client is at fault (bad request), false for server-side failures.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::Validation { .. } | EngineError::Template(_) | EngineError::Tokenizer(_)
        )
    }
}

/// Missing file error with a path in the message.
pub(crate) fn missing_file(path: PathBuf, hint: &str) -> EngineError {
    EngineError::NotFound(format!("{} not found{hint}", path.display()))
}
