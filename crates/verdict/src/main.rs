//! The `verdict` command: serve a classifier over HTTP, classify or score
//! files offline, and benchmark.

mod args;
mod bench;
mod classify;
mod score;
mod serve;

use clap::{Parser, Subcommand};

// Tensor ops allocate and free large buffers constantly; glibc returns them to
// the kernel each time (page faults and zeroing on every op), mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "verdict",
    version,
    about = "Serve Hugging Face sequence classifiers: vLLM's classification API, in Rust"
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    /// Default: info, or warn for `bench` (its server would log every request).
    #[arg(long, global = true)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the model over HTTP with vLLM's /classify, /pooling, /score and /rerank API.
    Serve(serve::ServeArgs),
    /// Classify texts or a file (plain lines or JSONL); writes JSONL.
    Classify(classify::ClassifyArgs),
    /// Score (query, document) pairs with a cross-encoder (num_labels == 1).
    Score(score::ScoreArgs),
    /// Run the "mixed" benchmark workload on a random-weight model of a real shape.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Bench(_) => "warn",
        _ => "info",
    };
    let level = cli
        .log_level
        .clone()
        .unwrap_or_else(|| default_level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("verdict: error: {e:#}");
        std::process::exit(1);
    }
}
