//! The accept loop and each connection's life: header read timeout, idle
//! keep-alive timeout, a cap on open connections, and a shutdown deadline.
//!
//! A client that opens connections and never finishes a request must not be
//! able to starve the others or the process of file descriptors: once the cap
//! is reached, the connection that has gone longest without finishing a
//! request (and has none in flight) makes room for the new one; only when
//! every connection is busy is the newcomer refused with a 503 (health probes
//! are still answered on that path).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower_service::Service;
use verdict_engine::Engine;

use crate::error::ApiError;
use crate::middleware::close_after;

/// Timeouts and the connection cap.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Connections past the cap that are still read (to answer a probe or say
/// 503 properly); beyond these a connection is closed at once.
const OVERFLOW_CONNECTIONS: usize = 64;
/// How long an over-the-cap connection may take to send its request head.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// The whole life of an over-the-cap connection.
const OVERFLOW_DEADLINE: Duration = Duration::from_secs(2);
/// File descriptors kept free for everything that is not a client connection
/// (model files, media fetches, the runtime).
const RESERVED_FDS: usize = 256;

/// One open connection, as the accept loop and the idle timer see it.
struct ConnectionSlot {
    /// Requests being served (from headers read until the response body is done).
    in_flight: AtomicUsize,
    /// Milliseconds since the registry's epoch of the last byte read or request finished.
    last_active_ms: AtomicU64,
    /// Milliseconds since the epoch of accepting or of the last finished request:
    /// a connection that never completes a request keeps its accept time.
    last_progress_ms: AtomicU64,
    /// Told to close (evicted to make room).
    evict: Notify,
    /// A request finished: the idle timer starts over.
    request_done: Notify,
}

/// The open connections.
struct Registry {
    epoch: Instant,
    slots: Mutex<HashMap<u64, Arc<ConnectionSlot>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn new() -> Self {
        Registry {
            epoch: Instant::now(),
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn insert(self: &Arc<Self>) -> SlotGuard {
        let now = self.now_ms();
        let slot = Arc::new(ConnectionSlot {
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now),
            last_progress_ms: AtomicU64::new(now),
            evict: Notify::new(),
            request_done: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, slot.clone());
        SlotGuard {
            registry: self.clone(),
            id,
            slot,
        }
    }

    /// Closes the connection with no request in flight that has gone longest
    /// without finishing one; false when every connection is busy.
    fn evict_one(&self) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let victim = slots
            .iter()
            .filter(|(_, s)| s.in_flight.load(Ordering::Relaxed) == 0)
            .min_by_key(|(_, s)| s.last_progress_ms.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match victim.and_then(|id| slots.remove(&id)) {
            Some(slot) => {
                // notify_one keeps the permit, so a task not yet waiting still sees it.
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes its connection from the registry when the connection task ends.
struct SlotGuard {
    registry: Arc<Registry>,
    id: u64,
    slot: Arc<ConnectionSlot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.registry
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// A request in flight on a connection; dropped when its response body is done
/// (or the request is abandoned).
struct InFlight {
    registry: Arc<Registry>,
    slot: Arc<ConnectionSlot>,
}

impl InFlight {
    fn begin(registry: &Arc<Registry>, slot: &Arc<ConnectionSlot>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            registry: registry.clone(),
            slot: slot.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.registry.now_ms();
        self.slot.last_active_ms.store(now, Ordering::Relaxed);
        self.slot.last_progress_ms.store(now, Ordering::Relaxed);
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.slot.request_done.notify_one();
    }
}

/// A response body that ends its request's [`InFlight`] when hyper drops it.
struct TrackedResponseBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// The socket, noting when bytes arrive (the idle timer counts from the last one).
struct ActivityIo {
    stream: TcpStream,
    registry: Arc<Registry>,
    slot: Arc<ConnectionSlot>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.registry.now_ms();
            self.slot.last_active_ms.store(now, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts and serves connections until `stop` fires, then lets requests in
/// flight finish for up to `shutdown_timeout` and cuts what is left.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    engine: Arc<Engine>,
    limits: ConnectionLimits,
    stop: impl std::future::Future<Output = ()>,
) {
    let max_connections = effective_connection_cap(limits.max_connections);
    let registry = Arc::new(Registry::new());
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    on_accept_error(&e, &registry).await;
                    continue;
                }
            },
        };
        // Small responses go out at once rather than waiting for more bytes.
        let _ = stream.set_nodelay(true);
        if registry.len() >= max_connections && !registry.evict_one() {
            match overflow.clone().try_acquire_owned() {
                Ok(permit) => {
                    let engine = engine.clone();
                    connections.spawn(async move {
                        refuse_connection(stream, engine).await;
                        drop(permit);
                    });
                }
                Err(_) => drop(stream), // closed at once: no work, no descriptor kept
            }
            continue;
        }
        let guard = registry.insert();
        connections.spawn(run_connection(
            stream,
            app.clone(),
            guard,
            limits,
            shutdown_rx.clone(),
        ));
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    let open = connections.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            "waiting for requests in flight to finish"
        );
    }
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            timeout_s = limits.shutdown_timeout.as_secs_f64(),
            "shutdown timeout reached: closing the remaining connections"
        );
        connections.shutdown().await;
    }
}

/// Out of descriptors (or another resource): make room by closing an idle
/// connection, and pause briefly instead of spinning on the error.
async fn on_accept_error(e: &io::Error, registry: &Registry) {
    // Errors of the one connection being accepted: the next accept is fine.
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) {
        return;
    }
    let evicted = registry.evict_one();
    tracing::warn!(error = %e, evicted_idle_connection = evicted, "accept failed");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// One connection: hyper's HTTP/1 with the header read timeout, plus the idle
/// keep-alive timer, eviction and graceful shutdown.
async fn run_connection(
    stream: TcpStream,
    app: Router,
    guard: SlotGuard,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let registry = guard.registry.clone();
    let slot = guard.slot.clone();
    let io = TokioIo::new(ActivityIo {
        stream,
        registry: registry.clone(),
        slot: slot.clone(),
    });
    let service = {
        let registry = registry.clone();
        let slot = slot.clone();
        service_fn(move |request: Request<Incoming>| {
            let in_flight = InFlight::begin(&registry, &slot);
            let mut app = app.clone();
            async move {
                std::future::poll_fn(|cx| Service::<Request<Incoming>>::poll_ready(&mut app, cx))
                    .await?;
                let response = app.call(request).await?;
                Ok::<_, Infallible>(response.map(|inner| TrackedResponseBody {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = *shutdown.borrow();
    if draining {
        return;
    }
    loop {
        let idle_check = if slot.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + limits.keep_alive_timeout
        } else {
            registry.instant_at(slot.last_active_ms.load(Ordering::Relaxed))
                + limits.keep_alive_timeout
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = slot.evict.notified() => {
                tracing::debug!("closing a connection to make room for a new one");
                return;
            }
            _ = slot.request_done.notified() => {}
            _ = tokio::time::sleep_until(idle_check) => {
                let idle_since = registry.instant_at(slot.last_active_ms.load(Ordering::Relaxed));
                if slot.in_flight.load(Ordering::Relaxed) == 0
                    && idle_since.elapsed() >= limits.keep_alive_timeout
                {
                    return;
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                if slot.in_flight.load(Ordering::Relaxed) == 0 {
                    return;
                }
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A connection past the cap: reads one request head (briefly), answers
/// health probes truthfully and everything else with 503, then closes.
async fn refuse_connection(stream: TcpStream, engine: Arc<Engine>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let alive = engine.is_alive();
        async move {
            let probe = matches!(request.uri().path(), "/health" | "/ping")
                && (request.method() == Method::GET || request.method() == Method::POST);
            let response = if probe {
                let status = if alive {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                status.into_response()
            } else {
                ApiError::unavailable(
                    "The server has reached its connection limit (--max-connections); retry later.",
                )
                .with_retry_after(1)
                .into_response()
            };
            Ok::<Response<Body>, Infallible>(close_after(response))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(OVERFLOW_HEADER_TIMEOUT)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(OVERFLOW_DEADLINE, conn).await;
}

/// The connection cap, lowered to fit the process's descriptor limit (raised
/// to its hard limit first): running out of descriptors would stop `accept`
/// for everyone, `/health` included.
fn effective_connection_cap(requested: usize) -> usize {
    let requested = requested.max(1);
    match raise_fd_limit() {
        Some(fds) if fds.saturating_sub(RESERVED_FDS) < requested => {
            let cap = fds.saturating_sub(RESERVED_FDS).max(1);
            tracing::warn!(
                requested,
                cap,
                fd_limit = fds,
                "--max-connections lowered to fit the open-file limit"
            );
            cap
        }
        _ => requested,
    }
}

/// Raises the soft open-file limit to the hard one; the resulting soft limit.
#[cfg(unix)]
fn raise_fd_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        // Linux refuses more than fs.nr_open (2^20 by default) even when the hard limit is unlimited.
        let target = limit.rlim_max.min(1 << 20);
        if limit.rlim_cur < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    usize::try_from(limit.rlim_cur).ok()
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<usize> {
    None
}
