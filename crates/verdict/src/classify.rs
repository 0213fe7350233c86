//! `verdict classify`: texts from the command line or a file (plain lines or
//! JSONL), results as JSONL, streamed so files of millions of lines run in
//! constant memory while the engine stays busy.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use verdict_engine::lora::LoraRef;
use verdict_engine::scheduler::WorkItem;
use verdict_engine::{
    ChatMessage, ChatOptions, Engine, EngineError, LoraRequest, PooledData, Prompt, SequenceInput,
    TokenizeOptions, TruncationSide,
};

use crate::args::EngineFlags;

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub engine: EngineFlags,

    /// Texts to classify (ignored when --input is given).
    pub texts: Vec<String>,

    /// A file to classify: one text per line, or JSONL with `{"prompt": ...}`,
    /// `{"prompt_token_ids": [...]}` or `{"messages": [...]}` per line. `-` reads stdin.
    /// A JSONL line may name a LoRA adapter of --lora-modules in `"model"`; lines for
    /// different adapters and the base model run in shared batches.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,

    /// How to read --input: `auto` (JSONL when a line is a JSON object with one of
    /// those keys, else plain text), `text` or `jsonl`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "text", "jsonl"])]
    pub format: String,

    /// Where to write JSONL results (default: stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,

    /// Keep only this many tokens of each prompt (-1: max-model-len).
    #[arg(long, allow_hyphen_values = true)]
    pub truncate_prompt_tokens: Option<i64>,

    /// Which end truncation cuts: right (keep the start) or left (keep the end).
    #[arg(long, value_parser = ["left", "right"])]
    pub truncation_side: Option<String>,

    /// Print raw logits instead of probabilities.
    #[arg(long)]
    pub no_activation: bool,

    /// Do not add the tokenizer's special tokens (CLS/SEP/BOS) to text prompts.
    #[arg(long)]
    pub no_special_tokens: bool,

    /// Never show the progress bar (it shows on stderr for long inputs otherwise).
    #[arg(long)]
    pub no_progress: bool,

    /// Classify through this PEFT LoRA adapter directory (turns on --enable-lora).
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

/// Prompts kept in flight between the reader and the writer.
const IN_FLIGHT: usize = 8192;

pub fn run(args: ClassifyArgs) -> Result<()> {
    let mut engine_args = args.engine.to_engine_args()?;
    if args.lora.is_some() {
        engine_args.enable_lora = true;
    }
    let engine = Arc::new(Engine::new(&engine_args).context("loading the model")?);
    let lora = match &args.lora {
        Some(path) => Some(
            engine
                .lora_adapter(&LoraRequest::from_path(path))
                .context("loading the LoRA adapter")?,
        ),
        None => None,
    };
    let tokenize = TokenizeOptions {
        truncate_prompt_tokens: args.truncate_prompt_tokens,
        truncation_side: args
            .truncation_side
            .as_deref()
            .and_then(TruncationSide::parse),
        add_special_tokens: args.no_special_tokens.then_some(false),
        ..TokenizeOptions::default()
    };
    let use_activation = !args.no_activation && engine.info().default_use_activation;

    let (lines, total_hint): (
        Box<dyn Iterator<Item = std::io::Result<String>> + Send>,
        Option<u64>,
    ) = match &args.input {
        Some(p) if p.as_os_str() == "-" => {
            (Box::new(BufReader::new(std::io::stdin()).lines()), None)
        }
        Some(p) => {
            let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let total = count_lines(p).ok();
            (Box::new(BufReader::new(f).lines()), total)
        }
        None => {
            if args.texts.is_empty() {
                anyhow::bail!("nothing to classify: give TEXT arguments or --input FILE");
            }
            let n = args.texts.len() as u64;
            (Box::new(args.texts.clone().into_iter().map(Ok)), Some(n))
        }
    };
    let format = match (&args.input, args.format.as_str()) {
        (None, _) => LineFormat::Text,
        (_, "text") => LineFormat::Text,
        (_, "jsonl") => LineFormat::Jsonl,
        _ => LineFormat::Auto,
    };

    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let progress = make_progress(total_hint, args.no_progress);

    // Results arrive out of order from the engine thread; the writer restores input order.
    let (tx, rx) = mpsc::channel::<(usize, LineResult)>();
    let (permit_tx, permit_rx) = mpsc::sync_channel::<()>(IN_FLIGHT);
    let reader_engine = engine.clone();
    let reader = std::thread::spawn(move || -> Result<usize> {
        let mut count = 0usize;
        for (index, line) in lines.enumerate() {
            let line = line.context("reading input")?;
            permit_tx.send(()).ok();
            count += 1;
            let parsed = parse_line(&line, format)
                .and_then(|l| Ok((line_adapter(&reader_engine, l.model.as_deref(), &lora)?, l)));
            let (adapter, Line { prompt, .. }) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send((index, Err(e)));
                    continue;
                }
            };
            match reader_engine.processor().process(&prompt, &tokenize) {
                Err(e) => {
                    let _ = tx.send((index, Err(e)));
                }
                Ok(tok) => {
                    let n = tok.ids.len();
                    let reply = tx.clone();
                    let input = SequenceInput::new(tok, use_activation).with_lora(adapter.clone());
                    let item = WorkItem::new(input, move |r| {
                        let _ = reply.send((index, r.map(|(d, _)| (d, n, adapter))));
                    });
                    if let Err(e) = reader_engine.submit(vec![item]) {
                        let _ = tx.send((index, Err(e)));
                    }
                }
            }
        }
        Ok(count)
    });

    let info = engine.info().clone();
    let mut pending: BTreeMap<usize, LineResult> = BTreeMap::new();
    let mut next = 0usize;
    let mut failures = 0usize;
    for (index, result) in rx {
        pending.insert(index, result);
        while let Some(result) = pending.remove(&next) {
            let record = match result {
                Ok((PooledData::Vector(probs), tokens, adapter)) => json!({
                    "index": next,
                    // An adapter with its own head has its own labels.
                    "label": match &adapter {
                        Some(adapter) => adapter.info().label_of(&probs),
                        None => info.label_of(&probs),
                    },
                    "num_classes": probs.len(),
                    "probs": probs,
                    "prompt_tokens": tokens,
                }),
                Ok((PooledData::Matrix(rows), tokens, _)) => json!({
                    "index": next,
                    "data": rows,
                    "prompt_tokens": tokens,
                }),
                Err(e) => {
                    failures += 1;
                    json!({"index": next, "error": {"message": e.to_string()}})
                }
            };
            serde_json::to_writer(&mut out, &record)?;
            out.write_all(b"\n")?;
            let _ = permit_rx.try_recv();
            progress.inc(1);
            next += 1;
        }
    }
    out.flush()?;
    progress.finish_and_clear();
    let count = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    if failures > 0 {
        eprintln!("verdict: {failures} of {count} prompts failed (see the `error` lines)");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum LineFormat {
    Auto,
    Text,
    Jsonl,
}

/// A line's result: the pooled data, its prompt tokens and the adapter it ran with.
type LineResult = Result<(PooledData, usize, Option<LoraRef>), EngineError>;

/// The adapter a line runs with: the one its `model` names (the base model for a
/// served name), else `--lora`'s.
fn line_adapter(
    engine: &Engine,
    model: Option<&str>,
    default: &Option<LoraRef>,
) -> Result<Option<LoraRef>, EngineError> {
    let Some(name) = model else {
        return Ok(default.clone());
    };
    if engine.info().served_model_names.iter().any(|n| n == name) {
        return Ok(None);
    }
    engine
        .lora()
        .and_then(|registry| registry.get(name))
        .map(|adapter| Some(LoraRef(adapter)))
        .ok_or_else(|| EngineError::NotFound(format!("The model `{name}` does not exist.")))
}

/// One input line: its prompt and, in JSONL, the `model` (a LoRA adapter) it names.
struct Line {
    prompt: Prompt,
    model: Option<String>,
}

fn parse_line(line: &str, format: LineFormat) -> Result<Line, EngineError> {
    let (prompt, json) = parse_prompt(line, format)?;
    let model = match json.as_ref().and_then(|v| v.get("model")) {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(_) => return Err(EngineError::validation("`model` must be a string")),
    };
    Ok(Line { prompt, model })
}

fn parse_prompt(line: &str, format: LineFormat) -> Result<(Prompt, Option<Value>), EngineError> {
    let trimmed = line.trim_start();
    let as_json = match format {
        LineFormat::Text => None,
        LineFormat::Jsonl => Some(
            serde_json::from_str::<Value>(line)
                .map_err(|e| EngineError::validation(format!("line is not valid JSON: {e}")))?,
        ),
        LineFormat::Auto if trimmed.starts_with('{') => {
            serde_json::from_str::<Value>(line).ok().filter(|v| {
                ["prompt", "prompt_token_ids", "messages", "text"]
                    .iter()
                    .any(|k| v.get(k).is_some())
            })
        }
        LineFormat::Auto => None,
    };
    let Some(v) = as_json else {
        return Ok((Prompt::Text(line.to_string()), None));
    };
    let prompt = prompt_of(&v)?;
    Ok((prompt, Some(v)))
}

fn prompt_of(v: &Value) -> Result<Prompt, EngineError> {
    if let Some(ids) = v.get("prompt_token_ids") {
        let ids: Vec<u32> = serde_json::from_value(ids.clone()).map_err(|e| {
            EngineError::validation(format!("prompt_token_ids must be a list of token ids: {e}"))
        })?;
        let token_type_ids = match v.get("token_type_ids") {
            Some(t) => Some(
                serde_json::from_value(t.clone())
                    .map_err(|e| EngineError::validation(format!("token_type_ids: {e}")))?,
            ),
            None => None,
        };
        return Ok(Prompt::Tokens {
            ids,
            token_type_ids,
        });
    }
    if let Some(m) = v.get("messages") {
        let messages: Vec<ChatMessage> = serde_json::from_value(m.clone())
            .map_err(|e| EngineError::validation(format!("messages: {e}")))?;
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let options = ChatOptions {
            add_generation_prompt: flag("add_generation_prompt"),
            continue_final_message: flag("continue_final_message"),
            template_kwargs: v
                .get("chat_template_kwargs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        };
        return Ok(Prompt::Chat { messages, options });
    }
    match v.get("prompt").or_else(|| v.get("text")) {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        _ => Err(EngineError::validation("`prompt` must be a string")),
    }
}

fn count_lines(path: &PathBuf) -> std::io::Result<u64> {
    let mut n = 0u64;
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        line?;
        n += 1;
    }
    Ok(n)
}

fn make_progress(total: Option<u64>, disabled: bool) -> ProgressBar {
    let show = !disabled && total.is_none_or(|t| t >= 1000);
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} prompts  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_line_formats() {
        assert_eq!(
            parse_line("plain text", LineFormat::Auto).unwrap().prompt,
            Prompt::Text("plain text".into())
        );
        assert_eq!(
            parse_line(r#"{"prompt":"hi"}"#, LineFormat::Auto)
                .unwrap()
                .prompt,
            Prompt::Text("hi".into())
        );
        assert_eq!(
            parse_line(r#"{"prompt_token_ids":[1,2]}"#, LineFormat::Auto)
                .unwrap()
                .prompt,
            Prompt::Tokens {
                ids: vec![1, 2],
                token_type_ids: None
            }
        );
        // A JSON-looking line without a known key stays text in auto mode.
        assert_eq!(
            parse_line(r#"{"other":1}"#, LineFormat::Auto)
                .unwrap()
                .prompt,
            Prompt::Text(r#"{"other":1}"#.into())
        );
        let line = parse_line(r#"{"prompt":"hi","model":"sql"}"#, LineFormat::Jsonl).unwrap();
        assert_eq!(line.model.as_deref(), Some("sql"));
        assert!(parse_line("not json", LineFormat::Jsonl).is_err());
        assert!(parse_line(r#"{"prompt_token_ids":[-1]}"#, LineFormat::Jsonl).is_err());
        assert!(matches!(
            parse_line(
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                LineFormat::Auto
            )
            .unwrap()
            .prompt,
            Prompt::Chat { .. }
        ));
    }
}
