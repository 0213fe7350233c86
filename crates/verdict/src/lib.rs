//! The `verdict` command as a library: the binary's `main` and the Python
//! wheel's `verdict` entry point both call [`run`].

mod args;
mod bench;
mod classify;
mod score;
mod serve;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

pub use args::{default_model_dir, EngineFlags, DEFAULT_MODEL_NAME};

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

/// Runs the command line `argv` (program name first) and returns the exit code.
pub fn run<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version land here too, with exit code 0.
            let _ = e.print();
            return e.exit_code();
        }
    };
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
    // A second call in one process (the Python entry point) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("verdict: error: {e:#}");
            1
        }
    }
}

/// The model flags alone, parsed as the command line parses them.
#[derive(Debug, Parser)]
#[command(name = "verdict", no_binary_name = true)]
struct ModelFlags {
    #[command(flatten)]
    engine: EngineFlags,
}

/// Engine arguments from model flags written as on the command line
/// (`["--model", "org/name", "--dtype", "float32"]`), with the command's defaults
/// and checks: the Python `LLM` builds its engine through this.
pub fn engine_args_from_flags<I, T>(flags: I) -> anyhow::Result<verdict_engine::EngineArgs>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let parsed = ModelFlags::try_parse_from(flags).map_err(flag_error)?;
    parsed.engine.to_engine_args()
}

/// clap's message on one line, without the terminal's usage and `--help` hints.
fn flag_error(e: clap::Error) -> anyhow::Error {
    let text = e.to_string();
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    anyhow::anyhow!("{}", kept.join(" ").trim_start_matches("error: "))
}
