//! verdict-server: vLLM's classification HTTP API (spec §6) over the verdict engine.
//!
//! [`serve`] runs until SIGINT/SIGTERM; [`spawn`] starts a server in the
//! background (tests, embedding) and hands back its address and a shutdown handle.

mod connection;
mod error;
mod execution;
mod fields;
mod metrics;
mod middleware;
mod protocol;
mod routes;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use verdict_engine::Engine;

pub use error::ApiError;

use crate::connection::ConnectionLimits;
use crate::execution::TokenizerPool;
use crate::metrics::ServerMetrics;
use crate::state::{AppState, SharedState};

/// Requests with media allowed to wait per media thread before more are refused with 503.
const MEDIA_QUEUE_PER_WORKER: usize = 8;

/// How the server listens and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// When set, every route but /health, /ping, /version and /metrics needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_request_body_bytes: usize,
    /// Most prompts (or documents) one request may carry.
    pub max_input_list_len: usize,
    /// Accept `chat_template` from requests.
    pub trust_request_chat_template: bool,
    /// Echo `X-Request-Id` (or a fresh one) in every response.
    pub enable_request_id_headers: bool,
    /// Tokenizer threads; 0 means one per core.
    pub tokenizer_workers: usize,
    /// Threads that fetch and decode images and videos (multimodal models),
    /// apart from the tokenizer threads so media never delays text requests.
    pub media_workers: usize,
    /// Most tokens `/tokenize` returns for one prompt; 0 means
    /// `max(65536, 2 * max_model_len)`.
    pub max_tokenize_tokens: usize,
    /// Open client connections at most; past it the connection that has gone
    /// longest without finishing a request (and has none in flight) is closed,
    /// or, when all are busy, the newcomer gets a 503.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and, between requests, to start the next).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body, counted from its headers.
    pub body_read_timeout: Duration,
    /// An idle kept-alive connection is closed after this long.
    pub keep_alive_timeout: Duration,
    /// After SIGTERM, requests in flight get this long before their connections are cut.
    pub shutdown_timeout: Duration,
    /// Refuse (503 + `Retry-After`) work that would wait longer than this in the
    /// engine queue, judged from the tokens queued and the measured throughput.
    /// `None` turns this admission check off.
    pub max_queue_wait: Option<Duration>,
    /// Serve `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (LoRA models).
    pub allow_runtime_lora_updating: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "0.0.0.0".into(),
            port: 8000,
            api_key: None,
            max_request_body_bytes: 32 * 1024 * 1024,
            max_input_list_len: 10_000,
            trust_request_chat_template: false,
            enable_request_id_headers: false,
            tokenizer_workers: 0,
            media_workers: 2,
            max_tokenize_tokens: 0,
            max_connections: 2048,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            max_queue_wait: Some(Duration::from_secs(5)),
            allow_runtime_lora_updating: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the tokenizer or media threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("the server task failed: {0}")]
    Task(String),
}

/// A server running in the background.
pub struct RunningServer {
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Stops accepting connections, lets in-flight requests finish (up to the
    /// shutdown timeout), and waits until it has.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops (after `shutdown` or a fatal error).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Task(e.to_string())),
        }
    }
}

/// Binds (port 0 picks a free port) and serves in the background.
pub async fn spawn(
    engine: Arc<Engine>,
    config: ServerConfig,
) -> Result<RunningServer, ServerError> {
    let bind_addr = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|source| ServerError::Bind {
            addr: bind_addr.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: bind_addr,
        source,
    })?;
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        shutdown_timeout: config.shutdown_timeout,
    };
    let state = app_state(engine.clone(), config)?;
    let metrics = state.metrics.clone();
    let tokenizer_workers = state.tokenizers.workers();
    let app = router(state);

    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            metrics.run_upkeep();
        }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        connection::serve(listener, app, engine, limits, async {
            // A dropped handle stops the server too.
            let _ = stopped.await;
        })
        .await;
        upkeep.abort();
        Ok(())
    });
    tracing::info!(%addr, tokenizer_workers, "verdict server listening");
    Ok(RunningServer {
        addr,
        stop: Some(stop),
        task,
    })
}

/// Everything a request needs: the engine, its metrics and the worker threads.
fn app_state(engine: Arc<Engine>, config: ServerConfig) -> Result<SharedState, ServerError> {
    let metrics = Arc::new(ServerMetrics::new(engine.stats()));
    let tokenizers = TokenizerPool::new("verdict-tokenizer", config.tokenizer_workers, None)
        .map_err(ServerError::Threads)?;
    // Only multimodal models get media threads; each may have a few requests waiting.
    let media = match engine.info().multimodal {
        Some(_) => {
            let workers = config.media_workers.max(1);
            Some(
                TokenizerPool::new(
                    "verdict-media",
                    workers,
                    Some(workers * MEDIA_QUEUE_PER_WORKER),
                )
                .map_err(ServerError::Threads)?,
            )
        }
        None => None,
    };
    let state = Arc::new(AppState {
        info: engine.info().clone(),
        engine,
        metrics: metrics.clone(),
        tokenizers,
        media,
        config,
    });
    Ok(state)
}

/// Every route and middleware as one service, without a listener: for driving
/// requests in-process (the fuzz targets; embedding behind another server).
pub fn app(engine: Arc<Engine>, config: ServerConfig) -> Result<Router, ServerError> {
    Ok(router(app_state(engine, config)?))
}

/// Serves until SIGINT or SIGTERM, then stops accepting, finishes in-flight requests and returns.
pub async fn serve(engine: Arc<Engine>, config: ServerConfig) -> Result<(), ServerError> {
    let mut server = spawn(engine, config).await?;
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        result = server.wait() => Some(result),
    };
    match failed {
        Some(result) => result,
        None => {
            tracing::info!("shutting down: finishing in-flight requests");
            let result = server.shutdown().await;
            tracing::info!("server stopped");
            result
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

fn router(state: SharedState) -> Router {
    use routes::{classify, info, invocations, lora, pooling, score, tokenize};

    let mut app = Router::new()
        .route("/pooling", post(pooling::pooling_route))
        .route("/invocations", post(invocations::invocations_route))
        .route("/v1/models", get(info::models))
        .route("/tokenize", post(tokenize::tokenize_route))
        .route("/detokenize", post(tokenize::detokenize_route))
        .route("/health", get(info::health))
        .route("/ping", get(info::health).post(info::health))
        .route("/version", get(info::version))
        .route("/metrics", get(info::metrics));
    // A model that cannot classify (ForTokenClassification) has no /classify at all.
    if state
        .info
        .supported_tasks
        .contains(&verdict_engine::PoolingTask::Classify)
    {
        app = app.route("/classify", post(classify::classify_route));
    }
    // Scoring exists only for num_labels == 1 classifiers; elsewhere these paths are 404.
    if state.info.supports_score() {
        app = app
            .route("/score", post(score::score_route))
            .route("/v1/score", post(score::score_route))
            .route("/rerank", post(score::rerank_route))
            .route("/v1/rerank", post(score::rerank_route))
            .route("/v2/rerank", post(score::rerank_route));
    }
    // Runtime adapter changes only when asked for (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING);
    // they need the API key like every inference route.
    if state.config.allow_runtime_lora_updating && state.engine.lora().is_some() {
        app = app
            .route("/v1/load_lora_adapter", post(lora::load_route))
            .route("/v1/unload_lora_adapter", post(lora::unload_route));
    }
    let body_limit = state.config.max_request_body_bytes;
    app.fallback(|| async { error::not_found_detail() })
        .method_not_allowed_fallback(|| async { error::method_not_allowed_detail() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::echo_request_id,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::guard_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
