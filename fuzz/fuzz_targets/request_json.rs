//! Every POST route of the server, in-process, with the input as its JSON body
//! (the tiny Qwen3 reranker fixture: it classifies, scores, reranks and has a
//! chat template). Bad bodies must get a 4xx; a 5xx other than 501/503 means a
//! request could break the server.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use verdict_engine::{Convert, DeviceArg, Engine, EngineArgs};
use verdict_server::ServerConfig;

const ROUTES: &[&str] = &[
    "/classify",
    "/pooling",
    "/score",
    "/v1/score",
    "/rerank",
    "/v2/rerank",
    "/tokenize",
    "/detokenize",
    "/invocations",
];

struct Server {
    runtime: tokio::runtime::Runtime,
    app: Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/models/qwen3-reranker"
        );
        let mut args = EngineArgs::new(model);
        args.device = DeviceArg::Cpu;
        args.convert = Convert::Classify;
        // As the fixture's reference was made: the LM head's yes/no rows as the score.
        args.hf_overrides = Some(serde_json::json!({
            "classifier_from_token": ["no", "yes"],
            "method": "from_2_way_softmax"
        }));
        args.max_model_len = Some(128);
        let engine = Arc::new(Engine::new(&args).expect("loading the fixture model"));
        let config = ServerConfig {
            tokenizer_workers: 1,
            max_input_list_len: 32,
            ..ServerConfig::default()
        };
        Server {
            // Timers too: the server bounds its JSON parsing and queue waits with them.
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            app: verdict_server::app(engine, config).expect("app"),
        }
    })
}

fuzz_target!(|body: &[u8]| {
    let server = server();
    for route in ROUTES {
        let request = Request::post(*route)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .expect("request");
        let response = server
            .runtime
            .block_on(server.app.clone().oneshot(request))
            .expect("infallible");
        let status = response.status();
        assert!(
            status.is_success()
                || status.is_client_error()
                || status == StatusCode::NOT_IMPLEMENTED
                || status == StatusCode::SERVICE_UNAVAILABLE,
            "{route} answered {status} for {:?}",
            String::from_utf8_lossy(body)
        );
    }
});
