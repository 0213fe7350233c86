//! `verdict score`: cross-encoder relevance scores for (query, document) pairs.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use verdict_engine::{
    Engine, EngineError, LoraRequest, PairLimits, PooledData, SequenceInput, TokenizeOptions,
};

use crate::args::EngineFlags;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub engine: EngineFlags,

    /// The query, then one or more documents to score against it.
    pub texts: Vec<String>,

    /// JSONL file of pairs: `{"query": ..., "document": ...}` (or text_1/text_2) per line.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,

    /// Where to write JSONL results (default: stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,

    /// Cut each query / document to this many tokens first (0: off).
    #[arg(long, default_value_t = 0)]
    pub max_tokens_per_query: usize,
    #[arg(long, default_value_t = 0)]
    pub max_tokens_per_doc: usize,

    /// Print raw logits instead of sigmoid scores.
    #[arg(long)]
    pub no_activation: bool,

    /// Score through this PEFT LoRA adapter directory (turns on --enable-lora).
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

const CHUNK: usize = 4096;

pub fn run(args: ScoreArgs) -> Result<()> {
    let mut engine_args = args.engine.to_engine_args()?;
    if args.lora.is_some() {
        engine_args.enable_lora = true;
    }
    let engine = Engine::new(&engine_args).context("loading the model")?;
    let info = engine.info().clone();
    let lora = match &args.lora {
        Some(path) => Some(
            engine
                .lora_adapter(&LoraRequest::from_path(path))
                .context("loading the LoRA adapter")?,
        ),
        None => None,
    };
    let num_labels = lora
        .as_ref()
        .map_or(info.num_labels, |a| a.info().num_labels);
    if !info.supports_score() || num_labels != 1 {
        bail!(
            "Scoring API is only enabled for num_labels == 1 (this model has {num_labels} labels)"
        );
    }
    let pairs: Vec<Result<(String, String), EngineError>> = match &args.input {
        Some(path) => {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut v = Vec::new();
            for line in BufReader::new(f).lines() {
                v.push(parse_pair(&line.context("reading input")?));
            }
            v
        }
        None => {
            let Some((query, docs)) = args.texts.split_first() else {
                bail!("give QUERY DOCUMENT... or --input FILE");
            };
            if docs.is_empty() {
                bail!("give at least one document after the query");
            }
            docs.iter()
                .map(|d| Ok((query.clone(), d.clone())))
                .collect()
        }
    };
    let limits = PairLimits {
        max_tokens_per_query: args.max_tokens_per_query,
        max_tokens_per_doc: args.max_tokens_per_doc,
        score_template: None,
    };
    let use_activation = !args.no_activation && info.default_use_activation;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let tok = TokenizeOptions::default();
    for (chunk_no, chunk) in pairs.chunks(CHUNK).enumerate() {
        let tokenized: Vec<Result<_, EngineError>> = chunk
            .iter()
            .map(|p| {
                let (q, d) = p
                    .as_ref()
                    .map_err(|e| EngineError::validation(e.to_string()))?;
                engine.processor().process_pair(q, d, &tok, &limits)
            })
            .collect();
        let inputs: Vec<SequenceInput> = tokenized
            .iter()
            .filter_map(|t| t.as_ref().ok())
            .map(|t| SequenceInput::new(t.clone(), use_activation).with_lora(lora.clone()))
            .collect();
        let mut results = engine.run_blocking(inputs, &|_| {}).into_iter();
        for (i, t) in tokenized.iter().enumerate() {
            let index = chunk_no * CHUNK + i;
            let record = match t {
                Err(e) => json!({"index": index, "error": {"message": e.to_string()}}),
                Ok(t) => match results.next() {
                    Some(Ok(PooledData::Vector(v))) if v.len() == 1 => {
                        json!({"index": index, "score": v[0], "prompt_tokens": t.ids.len()})
                    }
                    Some(Err(e)) => json!({"index": index, "error": {"message": e.to_string()}}),
                    _ => {
                        json!({"index": index, "error": {"message": "pooled_data should be a scalar score"}})
                    }
                },
            };
            serde_json::to_writer(&mut out, &record)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    engine.shutdown();
    Ok(())
}

fn parse_pair(line: &str) -> Result<(String, String), EngineError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| EngineError::validation(format!("line is not valid JSON: {e}")))?;
    let get = |a: &str, b: &str| {
        v.get(a)
            .or_else(|| v.get(b))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match (get("query", "text_1"), get("document", "text_2")) {
        (Some(q), Some(d)) => Ok((q, d)),
        _ => Err(EngineError::validation(
            "each line needs string `query` and `document` fields",
        )),
    }
}
