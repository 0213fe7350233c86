//! Shared test support: fixture references, engines loaded once per test
//! binary, servers on port 0 and small HTTP helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use serde_json::Value;
use verdict_engine::{DeviceArg, Engine, EngineArgs};
use verdict_server::{RunningServer, ServerConfig};

/// Probabilities must match transformers within this (CPU fp32).
pub const ATOL: f64 = 1e-4;

/// Two requests for the same prompt agree within this: tests share an engine,
/// their prompts may batch together, and the engine's f32 results can move by
/// a few ulps with the batch around them.
pub const BATCH_TOL: f64 = 1e-6;

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub num_labels: usize,
    pub activation: String,
    pub id2label: Option<serde_json::Map<String, Value>>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub text_pair: Option<String>,
    #[serde(default)]
    pub messages: Option<Value>,
    #[serde(default)]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub continue_final_message: bool,
    pub input_ids: Vec<u32>,
    pub logits: Vec<f64>,
    pub probs: Vec<f64>,
    #[serde(default)]
    pub token_logits: Option<Vec<Vec<f64>>>,
    #[serde(default)]
    pub token_probs: Option<Vec<Vec<f64>>>,
}

impl Reference {
    pub fn cases_of(&self, kind: &str) -> Vec<&Case> {
        self.cases.iter().filter(|c| c.kind == kind).collect()
    }

    pub fn case(&self, name: &str) -> &Case {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no reference case {name}"))
    }

    /// The label transformers' id2label gives the argmax (first maximum).
    pub fn label_of(&self, probs: &[f64]) -> Option<String> {
        let mut best = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > probs[best] {
                best = i;
            }
        }
        self.id2label
            .as_ref()?
            .get(&best.to_string())?
            .as_str()
            .map(str::to_owned)
    }
}

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

pub fn reference(name: &str) -> Reference {
    let path = fixture_dir(name).join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("parsing reference.json")
}

pub fn engine_args(name: &str) -> EngineArgs {
    let mut args = EngineArgs::new(fixture_dir(name).to_string_lossy());
    args.device = DeviceArg::Cpu;
    args.served_model_name = vec![format!("test/{name}")];
    args
}

pub fn load_engine(args: EngineArgs) -> Arc<Engine> {
    Arc::new(Engine::new(&args).unwrap_or_else(|e| panic!("loading {}: {e}", args.model)))
}

/// One engine per (key) for the whole test binary: loading is the slow part,
/// and the engine's threads do not depend on any test's runtime.
pub fn shared_engine(key: &str, make: impl FnOnce() -> EngineArgs) -> Arc<Engine> {
    /// Loaded at most once, even when tests ask for it at the same time.
    type EngineSlot = Arc<OnceLock<Arc<Engine>>>;
    static ENGINES: OnceLock<Mutex<HashMap<String, EngineSlot>>> = OnceLock::new();
    let slot = ENGINES
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key.to_string())
        .or_default()
        .clone();
    slot.get_or_init(|| load_engine(make())).clone()
}

pub fn local_config() -> ServerConfig {
    ServerConfig {
        host: "127.0.0.1".into(),
        port: 0,
        tokenizer_workers: 2,
        // Tests run side by side on one shared engine: one test's large request
        // must not turn another's into an overload 503. The admission tests set it.
        max_queue_wait: None,
        ..ServerConfig::default()
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
}

pub async fn start(engine: Arc<Engine>, config: ServerConfig) -> TestServer {
    let server = verdict_server::spawn(engine, config)
        .await
        .expect("starting the server");
    TestServer {
        base: format!("http://{}", server.addr),
        server,
        client: reqwest::Client::new(),
    }
}

/// A JSON answer: status, headers and parsed body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub bytes: Vec<u8>,
}

impl Answer {
    pub fn error_message(&self) -> &str {
        self.body["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {} {}", self.status, self.body))
    }

    pub fn error_type(&self) -> &str {
        self.body["error"]["type"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert_eq!(
            self.status, 200,
            "expected 200, got {}: {}",
            self.status, self.body
        );
        &self.body
    }

    #[track_caller]
    pub fn expect_error(&self, status: u16, kind: &str, contains: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.error_type(), kind, "{}", self.body);
        assert!(
            self.error_message().contains(contains),
            "{:?} does not contain {contains:?}",
            self.error_message()
        );
        assert_eq!(self.body["error"]["code"], status, "{}", self.body);
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("reading the body").to_vec();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        bytes,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.post_with(path, body, &[]).await
    }

    pub async fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
        let mut request = self.client.post(self.url(path)).json(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        answer(request.send().await.expect("sending the request")).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Answer {
        let mut request = self.client.post(self.url(path)).body(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        answer(request.send().await.expect("sending the request")).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.get_with(path, &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = self.client.get(self.url(path));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        answer(request.send().await.expect("sending the request")).await
    }

    pub async fn stop(self) {
        self.server.shutdown().await.expect("clean shutdown");
    }
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")))
        .collect()
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= atol,
            "{what}: {got:?} vs {want:?} (atol {atol})"
        );
    }
}

pub fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The body without the parts that legitimately differ between two runs.
pub fn stable_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("id");
        obj.remove("created");
    }
    v
}

/// Equal JSON, except that numbers may differ by `atol`: the engine's packed
/// batches are not bit-for-bit batch-invariant (f32 GEMM blocking depends on
/// the batch), so the same prompt can move by a few ulps with other neighbours.
#[track_caller]
pub fn assert_json_close(what: &str, got: &Value, want: &Value, atol: f64) {
    fn walk(path: &str, got: &Value, want: &Value, atol: f64) -> Result<(), String> {
        match (got, want) {
            (Value::Number(g), Value::Number(w)) => {
                let (g, w) = (
                    g.as_f64().unwrap_or(f64::NAN),
                    w.as_f64().unwrap_or(f64::NAN),
                );
                if (g - w).abs() <= atol {
                    Ok(())
                } else {
                    Err(format!("{path}: {g} vs {w}"))
                }
            }
            (Value::Array(g), Value::Array(w)) if g.len() == w.len() => g
                .iter()
                .zip(w)
                .enumerate()
                .try_for_each(|(i, (g, w))| walk(&format!("{path}[{i}]"), g, w, atol)),
            (Value::Object(g), Value::Object(w)) if g.len() == w.len() => {
                g.iter().try_for_each(|(k, gv)| match w.get(k) {
                    Some(wv) => walk(&format!("{path}.{k}"), gv, wv, atol),
                    None => Err(format!("{path}: key {k} only on one side")),
                })
            }
            _ if got == want => Ok(()),
            _ => Err(format!("{path}: {got} vs {want}")),
        }
    }
    if let Err(diff) = walk("", got, want, atol) {
        panic!("{what}: {diff}\n got  {got}\n want {want}");
    }
}
