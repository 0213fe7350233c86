//! Hostile clients over real TCP: made-up methods and paths, slowloris and
//! half-open floods, early errors on kept-alive connections, oversized
//! declared bodies, overload admission and the shutdown deadline.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use verdict_engine::Engine;
use verdict_server::ServerConfig;

fn engine() -> Arc<Engine> {
    shared_engine("bert", || engine_args("bert-cls"))
}

/// Short timeouts so the tests see them fire.
fn strict_config() -> ServerConfig {
    ServerConfig {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(1),
        ..local_config()
    }
}

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 client connection, spoken by hand.
struct Raw {
    stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(s: &TestServer) -> Raw {
        let stream = TcpStream::connect(s.server.addr).await.expect("connecting");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            self.stream.writable().await?;
            match self.stream.try_write(&bytes[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what has arrived into the buffer; 0 at end of stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one response (Content-Length framed), within 10 s.
    async fn response(&mut self) -> RawResponse {
        tokio::time::timeout(Duration::from_secs(10), self.read_response())
            .await
            .expect("no response within 10 s")
            .expect("reading the response")
    }

    async fn read_response(&mut self) -> std::io::Result<RawResponse> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill().await? == 0 {
                return Err(std::io::Error::other("closed before a whole response head"));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad response head {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        while self.buf.len() < head_end + length {
            if self.fill().await? == 0 {
                return Err(std::io::Error::other("closed inside the body"));
            }
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// True when the server closes the connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.buf.clear(), // e.g. a 408 before the close
            }
        }
    }
}

fn post_json(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_and_paths_do_not_grow_metrics() {
    let s = start(engine(), local_config()).await;
    let mut raw = Raw::connect(&s).await;
    let long_name = "Q".repeat(2000);
    for i in 0..300 {
        let request =
            format!("X{i}{long_name} /made/up/{i}/{long_name} HTTP/1.1\r\nHost: t\r\n\r\n");
        raw.send(request.as_bytes()).await.unwrap();
        let answer = raw.response().await;
        assert!(
            [404, 405].contains(&answer.status),
            "request {i}: {answer:?}"
        );
    }
    let metrics = s.get("/metrics").await;
    let text = String::from_utf8(metrics.bytes.clone()).unwrap();
    assert!(
        text.len() < 32 * 1024,
        "/metrics is {} bytes after 300 made-up requests",
        text.len()
    );
    assert!(!text.contains("QQQQ"), "a made-up name became a label");
    let series = text
        .lines()
        .filter(|l| l.starts_with("verdict_http_requests_total{"))
        .count();
    assert!(series <= 4, "{series} request series:\n{text}");
    assert!(
        text.contains(r#"verdict_http_requests_total{route="unmatched",method="other","#),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_after_the_header_timeout() {
    let s = Arc::new(start(engine(), strict_config()).await);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut raw = Raw::connect(&s).await;
        tasks.push(tokio::spawn(async move {
            raw.send(b"POST /classify HTTP/1.1\r\nHost: t\r\nX-Slow: ")
                .await
                .unwrap();
            // One byte every 200 ms, for at most 10 s: never a whole header.
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if raw.send(b"a").await.is_err() {
                    return true;
                }
                if raw.closed_within(Duration::from_millis(1)).await {
                    return true;
                }
            }
            false
        }));
    }
    // Meanwhile the server answers others.
    let probe = Instant::now();
    assert_eq!(s.get("/health").await.status, 200);
    assert!(probe.elapsed() < Duration::from_millis(500));
    for task in tasks {
        assert!(task.await.unwrap(), "a slowloris connection stayed open");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closing them took {took:?}");
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_flood_past_the_cap_cannot_stop_health() {
    let config = ServerConfig {
        max_connections: 50,
        ..strict_config()
    };
    let s = start(engine(), config).await;
    let mut flood = Vec::new();
    for _ in 0..250 {
        let mut raw = Raw::connect(&s).await;
        raw.send(b"POST /classify HTTP/1.1\r\nHo").await.unwrap();
        flood.push(raw);
    }
    // The newest connections push out the oldest half-open ones: a probe gets in at once.
    for _ in 0..5 {
        let probe = Instant::now();
        let mut raw = Raw::connect(&s).await;
        raw.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let answer = raw.response().await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let took = probe.elapsed();
        assert!(took < Duration::from_millis(500), "/health took {took:?}");
    }
    // Every half-open connection is gone after the header timeout.
    for (i, raw) in flood.iter_mut().enumerate() {
        assert!(
            raw.closed_within(Duration::from_secs(3)).await,
            "half-open connection {i} still open"
        );
    }
    s.post("/classify", &json!({"input": "still fine"}))
        .await
        .ok();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connections_are_closed() {
    let s = start(engine(), strict_config()).await;
    let mut raw = Raw::connect(&s).await;
    for _ in 0..3 {
        raw.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(raw.response().await.status, 200);
        // Within the keep-alive timeout the connection is reused.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let idle = Instant::now();
    assert!(raw.closed_within(Duration::from_secs(3)).await);
    let took = idle.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "closed after {took:?} idle"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_connections_busy_means_503_but_health_answers_and_slow_bodies_get_408() {
    let config = ServerConfig {
        max_connections: 2,
        ..strict_config()
    };
    let s = start(engine(), config).await;
    // Two requests whose bodies never finish: both connections are busy.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(&s).await;
        raw.send(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\":")
            .await
            .unwrap();
        slow.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = Raw::connect(&s).await;
    refused
        .send(&post_json("/classify", r#"{"input":"hi"}"#, ""))
        .await
        .unwrap();
    let answer = refused.response().await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(answer.closes());
    assert_eq!(
        answer.json()["error"]["type"],
        "ServiceUnavailableError",
        "{answer:?}"
    );
    let mut probe = Raw::connect(&s).await;
    probe
        .send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(probe.response().await.status, 200);
    // The slow bodies hit the body read timeout: 408 in the envelope, then close.
    for raw in &mut slow {
        let answer = raw.response().await;
        assert_eq!(answer.status, 408, "{answer:?}");
        assert_eq!(answer.json()["error"]["code"], 408);
        assert!(answer.closes());
        assert!(raw.closed_within(Duration::from_secs(2)).await);
    }
    // Room again.
    s.post("/classify", &json!({"input": "hi"})).await.ok();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_errors_keep_the_connection_usable() {
    let config = ServerConfig {
        api_key: Some("k".into()),
        ..local_config()
    };
    let s = start(engine(), config).await;
    let mut raw = Raw::connect(&s).await;
    let auth = "Authorization: Bearer k\r\n";
    let body = r#"{"input":"hello there"}"#;
    let steps: [(Vec<u8>, u16); 6] = [
        (post_json("/classify", body, ""), 401),
        (post_json("/nowhere", body, auth), 404),
        (
            format!(
                "POST /classify HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            400,
        ),
        (
            format!(
                "POST /nowhere HTTP/1.1\r\nHost: t\r\n{auth}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
            404,
        ),
        (
            format!("PUT /classify HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 4\r\n\r\nabcd")
                .into_bytes(),
            405,
        ),
        (post_json("/classify", body, auth), 200),
    ];
    for (i, (request, status)) in steps.iter().enumerate() {
        raw.send(request).await.unwrap();
        let answer = raw.response().await;
        assert_eq!(answer.status, *status, "step {i}: {answer:?}");
        assert!(!answer.closes(), "step {i} closed the connection");
    }
    // A large body left unsent: answered at once and the connection is closed, said so.
    raw.send(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let answer = raw.response().await;
    assert_eq!(answer.status, 401);
    assert!(answer.closes(), "{answer:?}");
    assert!(raw.closed_within(Duration::from_secs(2)).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_length_is_refused_from_the_header() {
    let config = ServerConfig {
        max_request_body_bytes: 4096,
        ..local_config()
    };
    let s = start(engine(), config).await;
    for expect in ["Expect: 100-continue\r\n", ""] {
        let mut raw = Raw::connect(&s).await;
        let started = Instant::now();
        raw.send(
            format!("POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{expect}Content-Length: 1000000000\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        // The first thing back is the refusal, not `100 Continue`.
        let answer = raw.response().await;
        assert_eq!(answer.status, 413, "{expect:?}: {answer:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let body = answer.json();
        assert_eq!(body["error"]["code"], 413, "{body}");
        assert_eq!(body["error"]["type"], "Payload Too Large", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("--max-request-body-bytes")),
            "{body}"
        );
        assert!(answer.closes());
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_retry_after_and_the_rest_is_served() {
    // Its own engine: the throughput it measures is this test's alone.
    let engine = shared_engine("bert-admission", || engine_args("bert-cls"));
    let config = ServerConfig {
        max_queue_wait: Some(Duration::from_millis(1)),
        ..local_config()
    };
    let s = Arc::new(start(engine, config).await);
    let long_prompt = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let request = json!({"input": vec![long_prompt; 8], "truncate_prompt_tokens": 500});
    let mut tasks = Vec::new();
    for _ in 0..48 {
        let s = s.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let response = s
                    .client
                    .post(s.url("/classify"))
                    .json(&request)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                    .expect("no request may time out");
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                seen.push((status, retry_after, body));
            }
            seen
        }));
    }
    let (mut served, mut refused) = (0, 0);
    for task in tasks {
        for (status, retry_after, body) in task.await.unwrap() {
            match status {
                200 => served += 1,
                503 => {
                    refused += 1;
                    assert!(retry_after.is_some_and(|r| r >= 1), "{body}");
                    assert_eq!(body["error"]["type"], "ServiceUnavailableError");
                    assert_eq!(body["error"]["code"], 503);
                    assert!(
                        body["error"]["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("--max-queue-wait")),
                        "{body}"
                    );
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    eprintln!("overload: {served} served, {refused} refused");
    assert!(
        served > 0 && refused > 0,
        "{served} served, {refused} refused"
    );
    assert_eq!(s.get("/health").await.status, 200);
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_stragglers_after_its_deadline() {
    let config = ServerConfig {
        body_read_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(30),
        keep_alive_timeout: Duration::from_secs(30),
        ..strict_config()
    };
    let s = start(engine(), config).await;
    let mut half_header = Raw::connect(&s).await;
    half_header.send(b"GET /heal").await.unwrap();
    let mut half_body = Raw::connect(&s).await;
    half_body
        .send(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    s.server.shutdown().await.expect("clean shutdown");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with a 1 s deadline"
    );
    assert!(half_header.closed_within(Duration::from_secs(1)).await);
    assert!(half_body.closed_within(Duration::from_secs(1)).await);
}
