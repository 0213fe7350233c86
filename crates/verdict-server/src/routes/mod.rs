//! The HTTP handlers, one module per endpoint family.

/// The axum handler of a JSON route whose logic is `$inner(&state, &headers,
/// body)`; `/invocations` calls the same logic functions directly.
macro_rules! json_route {
    ($name:ident => $inner:ident) => {
        pub async fn $name(
            axum::extract::State(state): axum::extract::State<crate::state::SharedState>,
            headers: axum::http::HeaderMap,
            crate::state::JsonBody(body): crate::state::JsonBody,
        ) -> Result<axum::response::Response, crate::error::ApiError> {
            $inner(&state, &headers, body).await
        }
    };
}

pub mod classify;
pub mod info;
pub mod invocations;
pub mod lora;
pub mod pooling;
pub mod score;
pub mod tokenize;
