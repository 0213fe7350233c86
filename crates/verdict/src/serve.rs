//! `verdict serve`.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use verdict_engine::Engine;
use verdict_server::ServerConfig;

use crate::args::EngineFlags;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineFlags,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Require `Authorization: Bearer <key>` on every route but /health, /ping, /version
    /// and /metrics (stricter than vLLM, which leaves /classify open).
    #[arg(long, env = "VERDICT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Refuse requests with 503 once this many sequences wait in the queue.
    #[arg(long, default_value_t = 65536)]
    pub max_queued_requests: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_request_body_bytes: usize,

    /// Most prompts (or documents) one request may carry.
    #[arg(long, default_value_t = 10_000)]
    pub max_input_list_len: usize,

    /// Allow requests to carry their own `chat_template`.
    #[arg(long)]
    pub trust_request_chat_template: bool,

    /// Threads that tokenize requests (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub tokenizer_workers: usize,

    /// Multimodal models: threads that fetch and decode images and videos, apart
    /// from the tokenizer threads (requests beyond 8 per thread waiting get 503).
    #[arg(long, default_value_t = 2)]
    pub media_workers: usize,

    /// Most tokens /tokenize returns for one prompt (0: max(65536, 2 x max-model-len)).
    #[arg(long, default_value_t = 0)]
    pub max_tokenize_tokens: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut engine_args = args.engine.to_engine_args()?;
    engine_args.max_queued_sequences = args.max_queued_requests;
    let started = std::time::Instant::now();
    let engine = Arc::new(Engine::new(&engine_args).context("loading the model")?);
    tracing::info!(
        model = %engine.info().served_name(),
        architecture = %engine.info().architecture,
        task = %engine.info().task,
        device = %engine.info().device,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_request_body_bytes: args.max_request_body_bytes,
        max_input_list_len: args.max_input_list_len,
        trust_request_chat_template: args.trust_request_chat_template,
        enable_request_id_headers: true,
        tokenizer_workers: args.tokenizer_workers,
        media_workers: args.media_workers,
        max_tokenize_tokens: args.max_tokenize_tokens,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(verdict_server::serve(engine, config))?;
    Ok(())
}
