//! `verdict._native`: the engine behind the Python package. The `verdict`
//! package (pure Python) shapes vLLM's API on top of these few calls.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pyo3::exceptions::{PyFileNotFoundError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use verdict_engine::{
    into_scores, ChatMessage, ChatOptions, EngineError, InvalidPrompt, Llm, ParamsArg, PendingCall,
    PoolingParams, PoolingRequestOutput, PoolingTask, Prompt, StepParams, TokenizeOptions,
    TruncationSide,
};

// The same allocator as the `verdict` binary (see its main.rs), so offline calls
// from Python run as fast as the command.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long the engine runs between checks for Ctrl-C and progress updates.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Engine errors as the Python exceptions vLLM raises for them, same messages.
fn to_py_err(e: EngineError) -> PyErr {
    let msg = e.to_string();
    match e {
        EngineError::Validation { .. } | EngineError::Template(_) | EngineError::Tokenizer(_) => {
            PyValueError::new_err(msg)
        }
        EngineError::NotImplemented(_) => PyNotImplementedError::new_err(msg),
        EngineError::NotFound(_) => PyFileNotFoundError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// Set by the package's `atexit` hook once the interpreter is exiting.
static INTERPRETER_EXITING: AtomicBool = AtomicBool::new(false);

/// A loaded model and its scheduler (vLLM's `LLM` engine).
#[pyclass(frozen, module = "verdict._native")]
struct Engine {
    llm: ManuallyDrop<Llm>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Stopping an engine waits for its running batch. While the interpreter
        // exits (after Ctrl-C, say) the process's end stops the engine threads
        // anyway, so it is left to that instead of delaying the exit.
        if !INTERPRETER_EXITING.load(Ordering::Relaxed) {
            // SAFETY: dropped once, here; `self.llm` is not used after `drop`.
            unsafe { ManuallyDrop::drop(&mut self.llm) }
        }
    }
}

/// One prompt as the Python layer hands it over: a `str`, or a tagged tuple
/// `("tokens", ids, token_type_ids | None)` / `("chat", messages_json, options_json)`.
fn to_prompt(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(text) = obj.extract::<String>() {
        return Ok(Prompt::Text(text));
    }
    let tuple = obj.cast::<PyTuple>().map_err(|_| {
        PyValueError::new_err(format!(
            "a prompt must be a str, a token-id prompt or chat messages, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    let tag: String = tuple.get_item(0)?.extract()?;
    match tag.as_str() {
        "tokens" => Ok(Prompt::Tokens {
            ids: tuple.get_item(1)?.extract()?,
            token_type_ids: tuple.get_item(2)?.extract()?,
        }),
        "chat" => {
            let messages: String = tuple.get_item(1)?.extract()?;
            let options: String = tuple.get_item(2)?.extract()?;
            let messages: Vec<ChatMessage> = serde_json::from_str(&messages)
                .map_err(|e| PyValueError::new_err(format!("invalid chat messages: {e}")))?;
            let options: serde_json::Value = serde_json::from_str(&options)
                .map_err(|e| PyValueError::new_err(format!("invalid chat options: {e}")))?;
            Ok(Prompt::Chat {
                messages,
                options: ChatOptions {
                    add_generation_prompt: options["add_generation_prompt"]
                        .as_bool()
                        .unwrap_or(false),
                    continue_final_message: options["continue_final_message"]
                        .as_bool()
                        .unwrap_or(false),
                    template_kwargs: options["chat_template_kwargs"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                },
            })
        }
        other => Err(PyValueError::new_err(format!(
            "unknown prompt kind {other:?}"
        ))),
    }
}

/// `(use_activation, dimensions, step_tag_id, returned_token_ids,
/// max_tokens_per_query, max_tokens_per_doc)`, from `verdict.PoolingParams`.
type ParamsTuple = (
    Option<bool>,
    Option<usize>,
    Option<u32>,
    Option<Vec<u32>>,
    usize,
    usize,
);

fn to_params(t: ParamsTuple) -> PoolingParams {
    let (use_activation, dimensions, step_tag_id, returned_token_ids, per_query, per_doc) = t;
    PoolingParams {
        use_activation,
        dimensions,
        max_tokens_per_query: per_query,
        max_tokens_per_doc: per_doc,
        step: StepParams {
            step_tag_id,
            returned_token_ids,
        },
    }
}

fn to_tokenization(
    truncate_prompt_tokens: Option<i64>,
    truncation_side: Option<&str>,
    add_special_tokens: Option<bool>,
) -> PyResult<TokenizeOptions> {
    let truncation_side = match truncation_side {
        None => None,
        Some(s) => Some(TruncationSide::parse(s).ok_or_else(|| {
            PyValueError::new_err(format!(
                "truncation_side must be 'left' or 'right', not {s:?}"
            ))
        })?),
    };
    Ok(TokenizeOptions {
        truncate_prompt_tokens,
        truncation_side,
        add_special_tokens,
        ..TokenizeOptions::default()
    })
}

/// Drives a call to its end with the GIL released, checking for signals
/// (Ctrl-C) and reporting progress between slices; a raised signal or a failing
/// progress callback cancels the work still queued.
fn drive(
    py: Python<'_>,
    mut call: PendingCall<'_>,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<PoolingRequestOutput>> {
    let mut reported = 0usize;
    loop {
        let finished = py.detach(|| call.wait(WAIT_SLICE));
        if let Err(e) = py.check_signals() {
            call.cancel();
            return Err(e);
        }
        if let Some(cb) = progress {
            if call.done() != reported {
                reported = call.done();
                if let Err(e) = cb.call1((reported,)) {
                    call.cancel();
                    return Err(e);
                }
            }
        }
        if finished {
            break;
        }
    }
    let results = call.finish().map_err(to_py_err)?;
    results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(to_py_err)
}

#[pymethods]
impl Engine {
    /// Loads a model. `flags` are the command line's model flags
    /// (`["--model", "...", "--dtype", "float32"]`), so `LLM(...)` and
    /// `verdict serve` accept and check the same settings.
    #[new]
    fn new(py: Python<'_>, flags: Vec<String>) -> PyResult<Self> {
        let args = verdict::engine_args_from_flags(flags)
            .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        // Loading (a download, a large checkpoint) runs on its own thread so
        // Ctrl-C is noticed meanwhile; an abandoned load finishes and is dropped there.
        let loading = std::thread::Builder::new()
            .name("verdict-load".into())
            .spawn(move || Llm::new(args))
            .map_err(|e| PyRuntimeError::new_err(format!("starting the model loader: {e}")))?;
        while !loading.is_finished() {
            py.detach(|| std::thread::sleep(WAIT_SLICE));
            py.check_signals()?;
        }
        let llm = loading
            .join()
            .map_err(|_| PyRuntimeError::new_err("the model loader panicked"))?
            .map_err(to_py_err)?;
        Ok(Engine {
            llm: ManuallyDrop::new(llm),
        })
    }

    /// What the loaded model is: architecture, task, labels, limits.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = self.llm.info();
        let d = PyDict::new(py);
        d.set_item("served_model_name", info.served_name())?;
        d.set_item("model_dir", info.model_dir.to_string_lossy().as_ref())?;
        d.set_item("architecture", &info.architecture)?;
        d.set_item("task", info.task.as_str())?;
        let tasks: Vec<&str> = info.supported_tasks.iter().map(|t| t.as_str()).collect();
        d.set_item("supported_tasks", tasks)?;
        d.set_item("num_labels", info.num_labels)?;
        d.set_item("id2label", info.id2label.clone())?;
        d.set_item("default_use_activation", info.default_use_activation)?;
        d.set_item("max_model_len", info.max_model_len)?;
        d.set_item("max_num_batched_tokens", info.max_num_batched_tokens)?;
        d.set_item("max_num_seqs", info.max_num_seqs)?;
        d.set_item("device", &info.device)?;
        d.set_item("dtype", format!("{:?}", info.dtype).to_lowercase())?;
        d.set_item("multimodal", info.multimodal.is_some())?;
        Ok(d)
    }

    /// Pools `prompts` for `task`; fails as a whole on the first invalid prompt.
    /// `params`: None, one tuple for all prompts, or a list with one per prompt.
    /// Returns `(request_id, prompt_token_ids, data: bytes of float32, shape)` each.
    #[pyo3(signature = (prompts, params, task, truncate_prompt_tokens=None, truncation_side=None, add_special_tokens=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Bound<'py, PyAny>>,
        params: Option<Bound<'py, PyAny>>,
        task: Option<String>,
        truncate_prompt_tokens: Option<i64>,
        truncation_side: Option<String>,
        add_special_tokens: Option<bool>,
        progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let prompts = prompts
            .iter()
            .map(to_prompt)
            .collect::<PyResult<Vec<_>>>()?;
        let task = match task {
            None => None,
            Some(name) => Some(PoolingTask::parse(&name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "Unsupported task: '{name}' Supported tasks: {}",
                    supported_tasks(&self.llm)
                ))
            })?),
        };
        let (one, each) = match &params {
            None => (None, None),
            Some(p) if p.cast::<pyo3::types::PyList>().is_ok() => {
                let list: Vec<ParamsTuple> = p.extract()?;
                (
                    None,
                    Some(list.into_iter().map(to_params).collect::<Vec<_>>()),
                )
            }
            Some(p) => (Some(to_params(p.extract()?)), None),
        };
        let params = match (&one, &each) {
            (Some(p), _) => ParamsArg::All(p),
            (_, Some(ps)) => ParamsArg::PerPrompt(ps),
            _ => ParamsArg::Default,
        };
        let tokenization = to_tokenization(
            truncate_prompt_tokens,
            truncation_side.as_deref(),
            add_special_tokens,
        )?;
        let call = self
            .llm
            .start_encode(
                &prompts,
                params,
                task,
                &tokenization,
                InvalidPrompt::FailCall,
            )
            .map_err(to_py_err)?;
        let outputs = drive(py, call, progress.as_ref())?;
        outputs.into_iter().map(|o| output_tuple(py, o)).collect()
    }

    /// Cross-encoder scores of 1:1, 1:N or N:N pairs:
    /// `(request_id, prompt_token_ids, score)` each.
    #[pyo3(signature = (data_1, data_2, params=None, truncate_prompt_tokens=None, truncation_side=None, add_special_tokens=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        py: Python<'_>,
        data_1: Vec<String>,
        data_2: Vec<String>,
        params: Option<ParamsTuple>,
        truncate_prompt_tokens: Option<i64>,
        truncation_side: Option<String>,
        add_special_tokens: Option<bool>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<(String, Vec<u32>, f32)>> {
        let params = params.map(to_params);
        let tokenization = to_tokenization(
            truncate_prompt_tokens,
            truncation_side.as_deref(),
            add_special_tokens,
        )?;
        let call = self
            .llm
            .start_score(&data_1, &data_2, params.as_ref(), &tokenization)
            .map_err(to_py_err)?;
        let outputs = drive(py, call, progress.as_ref())?;
        let scores = into_scores(outputs.into_iter().map(Ok).collect()).map_err(to_py_err)?;
        Ok(scores
            .into_iter()
            .map(|s| (s.request_id, s.prompt_token_ids, s.score))
            .collect())
    }
}

fn supported_tasks(llm: &Llm) -> String {
    let names: Vec<String> = llm
        .info()
        .supported_tasks
        .iter()
        .map(|t| format!("'{t}'"))
        .collect();
    format!("({})", names.join(", "))
}

fn output_tuple<'py>(py: Python<'py>, o: PoolingRequestOutput) -> PyResult<Bound<'py, PyTuple>> {
    let (values, shape) = match &o.outputs {
        verdict_engine::PooledData::Vector(v) => (v.clone(), vec![v.len()]),
        verdict_engine::PooledData::Matrix(rows) => {
            let cols = rows.first().map_or(0, Vec::len);
            (o.outputs.flatten(), vec![rows.len(), cols])
        }
    };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    (
        o.request_id,
        o.prompt_token_ids,
        PyBytes::new(py, &bytes),
        PyTuple::new(py, shape)?,
    )
        .into_pyobject(py)
}

/// Runs the `verdict` command line (`argv[0]` is the program name) in this
/// process and returns its exit code: the wheel's `verdict` entry point.
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| verdict::run(argv))
}

/// Called at interpreter exit (registered with `atexit` by the package).
#[pyfunction]
fn interpreter_exiting() {
    INTERPRETER_EXITING.store(true, Ordering::Relaxed);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(interpreter_exiting, m)?)?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
