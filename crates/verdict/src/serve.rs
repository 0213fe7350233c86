//! `verdict serve`.

use std::sync::Arc;
use std::time::Duration;

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

    /// Most open client connections. Past it the connection that has gone longest
    /// without finishing a request makes room; when all are busy the newcomer gets 503.
    /// Lowered to fit the open-file limit.
    #[arg(long, default_value_t = 2048)]
    pub max_connections: usize,

    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value = "10", value_parser = parse_positive_seconds)]
    pub header_read_timeout: Duration,

    /// Seconds a client has to send a request's body, counted from its headers (408 after).
    #[arg(long, default_value = "30", value_parser = parse_positive_seconds)]
    pub body_read_timeout: Duration,

    /// Seconds an idle kept-alive connection stays open.
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub keep_alive_timeout: Duration,

    /// Seconds requests in flight get to finish after SIGTERM/SIGINT before their
    /// connections are cut.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,

    /// Answer 503 with Retry-After when the work already queued would keep a new
    /// request waiting longer than this many seconds (from queued tokens and the
    /// measured throughput); 0 turns the check off.
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub max_queue_wait: Duration,

    /// How much lower than the HTTP threads the model and tokenizer threads run
    /// (niceness 0-19; 0 keeps one priority), so that `/health` and new connections
    /// are answered promptly while compute saturates every core.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub compute_niceness: i32,
    /// Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
    /// VLLM_ALLOW_RUNTIME_LORA_UPDATING); needs --enable-lora.
    #[arg(long)]
    pub allow_runtime_lora_updating: bool,
}

/// Seconds as a (possibly fractional) non-negative number.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("{text:?} is not a non-negative number of seconds"))
}

fn parse_positive_seconds(text: &str) -> Result<Duration, String> {
    let seconds = parse_seconds(text)?;
    if seconds.is_zero() {
        return Err(format!("{text:?}: the timeout must be above 0 seconds"));
    }
    Ok(seconds)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut engine_args = args.engine.to_engine_args()?;
    engine_args.max_queued_sequences = args.max_queued_requests;
    // Before the engine exists: its threads and the matrix-product pool take this on start.
    verdict_engine::priority::set_compute_niceness(args.compute_niceness);
    if args.allow_runtime_lora_updating && !engine_args.enable_lora {
        anyhow::bail!("--allow-runtime-lora-updating needs --enable-lora");
    }
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
        max_connections: args.max_connections,
        header_read_timeout: args.header_read_timeout,
        body_read_timeout: args.body_read_timeout,
        keep_alive_timeout: args.keep_alive_timeout,
        shutdown_timeout: args.shutdown_timeout,
        max_queue_wait: Some(args.max_queue_wait).filter(|wait| !wait.is_zero()),
        allow_runtime_lora_updating: args.allow_runtime_lora_updating,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(verdict_server::serve(engine, config))?;
    Ok(())
}
