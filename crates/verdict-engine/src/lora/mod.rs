//! LoRA adapters (PEFT format) served on one base model.
//!
//! While the backbone loads, every linear layer an adapter may target registers a
//! [`TargetSpec`]: its PEFT module names and which of its output rows each one
//! produces (a packed QKV weight holds `q_proj`, `k_proj` and `v_proj`; a split
//! fused `qkv_proj` gives each of its three layers a slice of one module). An
//! adapter is loaded against that list into one low-rank pair per layer, `x A^T B^T`
//! with the scaling folded into `B`.
//!
//! A batch may mix adapters and the base model: the runner scopes the forward pass
//! with the adapter of every token row ([`scoped`]). Each targeted layer then adds
//! every segment's own low-rank update ([`adapted_matmul`]): rows of the base
//! model, and of adapters that leave the layer alone, get no update. The scope is
//! the engine thread's own, so the model code keeps its signatures.

mod config;
mod registry;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

pub use config::{AdapterConfig, TargetModules};
pub(crate) use registry::BaseModel;
pub use registry::{LoraLimits, LoraModuleArg, LoraRegistry};

use crate::error::Result;
use crate::pooling::{Activation, ClassifierHead};

/// Index of a registered layer in the model's target list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetId(usize);

/// One PEFT module's share of a layer's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPart {
    /// The module's name in the checkpoint (its weight name without `.weight`).
    pub module: String,
    /// Rows of the module's output this layer computes.
    pub module_rows: Range<usize>,
    /// Where they start in this layer's output.
    pub offset: usize,
}

/// A linear layer adapters may target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub in_dim: usize,
    pub out_dim: usize,
    pub parts: Vec<TargetPart>,
}

impl TargetSpec {
    /// A layer that is exactly one module.
    pub fn whole(module: String, in_dim: usize, out_dim: usize) -> Self {
        TargetSpec {
            in_dim,
            out_dim,
            parts: vec![TargetPart {
                module,
                module_rows: 0..out_dim,
                offset: 0,
            }],
        }
    }

    /// A layer computing rows `rows` of one module (half of a fused gate/up weight).
    pub fn slice(module: String, in_dim: usize, rows: Range<usize>) -> Self {
        TargetSpec {
            in_dim,
            out_dim: rows.len(),
            parts: vec![TargetPart {
                module,
                module_rows: rows,
                offset: 0,
            }],
        }
    }
}

/// Collects the targets of a backbone as it loads; off unless LoRA is enabled.
#[derive(Debug, Default)]
pub struct TargetCollector(Mutex<Vec<TargetSpec>>);

impl TargetCollector {
    pub fn register(&self, spec: TargetSpec) -> TargetId {
        let mut specs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        specs.push(spec);
        TargetId(specs.len() - 1)
    }

    pub fn into_specs(self) -> Vec<TargetSpec> {
        self.0.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// `x A^T B^T` for one layer: `a_t` `[in, R]` and `b_t` `[R, out]`, the scaling in B.
#[derive(Debug, Clone)]
struct LowRank {
    a_t: Tensor,
    b_t: Tensor,
}

/// A classification head an adapter brings (`modules_to_save`).
pub struct AdapterHead {
    pub head: ClassifierHead,
    pub activation: Activation,
}

/// A loaded adapter.
pub struct LoraAdapter {
    /// Unique for the life of the engine (a name can be reloaded with other weights).
    id: u64,
    info: LoraInfo,
    /// One entry per model target.
    layers: Vec<Option<LowRank>>,
    head: Option<AdapterHead>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("name", &self.info.name)
            .finish()
    }
}

impl LoraAdapter {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn info(&self) -> &LoraInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The head replacing the model's, when the adapter saved one.
    pub fn head(&self) -> Option<&AdapterHead> {
        self.head.as_ref()
    }
}

/// What the API layers know of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    pub name: String,
    pub path: PathBuf,
    /// The largest rank of its modules.
    pub rank: usize,
    /// Layers it adapts.
    pub adapted_layers: usize,
    /// Its head's labels (the model's when it keeps the model's head).
    pub num_labels: usize,
    pub id2label: Option<BTreeMap<usize, String>>,
    /// Whether it replaces the model's classification head.
    pub has_head: bool,
}

impl LoraInfo {
    /// The label of the highest value, as `ModelInfo::label_of`.
    pub fn label_of(&self, probs: &[f32]) -> Option<String> {
        let labels = self.id2label.as_ref()?;
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |best, (i, v)| if *v > probs[best] { i } else { best });
        labels.get(&best).cloned()
    }
}

/// A sequence's adapter, compared by identity.
#[derive(Clone)]
pub struct LoraRef(pub Arc<LoraAdapter>);

impl PartialEq for LoraRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl std::fmt::Debug for LoraRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoraRef({})", self.0.info.name)
    }
}

impl std::ops::Deref for LoraRef {
    type Target = LoraAdapter;
    fn deref(&self) -> &LoraAdapter {
        &self.0
    }
}

/// One layer's factors of every adapter of a [`LoraStack`] that adapts it, side
/// by side: `a_t` `[in, R]` and `b_t` `[R, out]`.
#[derive(Debug)]
struct StackedLayer {
    a_t: Tensor,
    b_t: Tensor,
    /// Per slot: its adapter's columns of `a_t` (rows of `b_t`), `None` when that
    /// adapter leaves the layer alone.
    columns: Vec<Option<Range<usize>>>,
}

/// The adapters a batch may use, with each layer's factors concatenated once (not
/// per batch): the registry rebuilds it when an adapter loads or unloads, so every
/// segment of a forward pass reads its factors as views of one pair per layer.
#[derive(Debug, Default)]
pub struct LoraStack {
    /// Slot order.
    adapters: Vec<Arc<LoraAdapter>>,
    /// One entry per model target; `None` where no adapter adapts the layer.
    layers: Vec<Option<StackedLayer>>,
}

impl LoraStack {
    pub(crate) fn build(adapters: Vec<Arc<LoraAdapter>>) -> Result<Self> {
        let targets = adapters.iter().map(|a| a.layers.len()).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(targets);
        for t in 0..targets {
            let mut a_parts = Vec::new();
            let mut b_parts = Vec::new();
            let mut columns = Vec::with_capacity(adapters.len());
            let mut width = 0;
            for adapter in &adapters {
                let pair = adapter.layers.get(t).and_then(Option::as_ref);
                columns.push(match pair {
                    Some(pair) => {
                        a_parts.push(&pair.a_t);
                        b_parts.push(&pair.b_t);
                        let rank = pair.b_t.dim(0)?;
                        width += rank;
                        Some(width - rank..width)
                    }
                    None => None,
                });
            }
            layers.push(if a_parts.is_empty() {
                None
            } else {
                Some(StackedLayer {
                    a_t: Tensor::cat(&a_parts, 1)?.contiguous()?,
                    b_t: Tensor::cat(&b_parts, 0)?.contiguous()?,
                    columns,
                })
            });
        }
        Ok(LoraStack { adapters, layers })
    }

    fn slot_of(&self, adapter: &LoraAdapter) -> Option<usize> {
        self.adapters.iter().position(|a| a.id == adapter.id)
    }
}

/// The adapters of a packed batch: which adapter each token row runs with.
#[derive(Debug, Clone)]
pub struct BatchAdapters {
    stack: Arc<LoraStack>,
    /// The batch's runs of rows with one adapter (its slot in `stack`), in row order;
    /// base-model rows are in none.
    runs: Vec<(Range<usize>, usize)>,
    rows: usize,
}

impl BatchAdapters {
    /// From each sequence's adapter and token count, with the factors of `loaded`
    /// (the registry's stack) when it holds all the batch's adapters, else stacked
    /// for this batch (an adapter unloaded while its requests waited); `None` when
    /// no sequence has an adapter.
    pub fn for_sequences<'a>(
        loaded: Option<&Arc<LoraStack>>,
        seqs: impl IntoIterator<Item = (Option<&'a Arc<LoraAdapter>>, usize)>,
    ) -> Result<Option<Self>> {
        let seqs: Vec<_> = seqs.into_iter().collect();
        let mut used: Vec<Arc<LoraAdapter>> = Vec::new();
        for adapter in seqs.iter().filter_map(|(a, _)| *a) {
            if !used.iter().any(|b| b.id == adapter.id) {
                used.push(adapter.clone());
            }
        }
        if used.is_empty() {
            return Ok(None);
        }
        let stack = match loaded {
            Some(stack) if used.iter().all(|a| stack.slot_of(a).is_some()) => stack.clone(),
            _ => Arc::new(LoraStack::build(used)?),
        };
        let mut runs: Vec<(Range<usize>, usize)> = Vec::new();
        let mut rows = 0;
        for (adapter, len) in seqs {
            if let Some(slot) = adapter.and_then(|a| stack.slot_of(a)) {
                match runs.last_mut() {
                    Some((run, s)) if *s == slot && run.end == rows => run.end += len,
                    _ => runs.push((rows..rows + len, slot)),
                }
            }
            rows += len;
        }
        Ok(Some(BatchAdapters { stack, runs, rows }))
    }

    /// The segments of rows `rows` (a layer input's, as rows of the batch) whose
    /// adapter adapts `layer`, as rows of that input. A runner that orders sequences
    /// by adapter makes one per adapter.
    fn segments(&self, rows: Range<usize>, layer: &StackedLayer) -> Vec<LoraSegment> {
        self.runs
            .iter()
            .filter_map(|(run, slot)| {
                let start = run.start.max(rows.start);
                let end = run.end.min(rows.end);
                let columns = layer.columns.get(*slot)?.clone()?;
                (start < end).then(|| LoraSegment {
                    rows: start - rows.start..end - rows.start,
                    columns,
                })
            })
            .collect()
    }
}

/// Rows of a layer input that run with one adapter's factors: its columns of the
/// layer's stacked `a_t` (rows of `b_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoraSegment {
    pub rows: Range<usize>,
    pub columns: Range<usize>,
}

struct Scope {
    batch: BatchAdapters,
    /// Row of the batch that row 0 of the current layer input is (row-chunked MLPs).
    row_offset: usize,
}

thread_local! {
    static ACTIVE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Restores the previous scope, also when the forward pass unwinds.
struct Restore(Option<Scope>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

/// Runs `f` (a forward pass over a packed batch) with the batch's adapters
/// applied; with `None` it runs as the plain model.
pub fn scoped<R>(batch: Option<BatchAdapters>, f: impl FnOnce() -> R) -> R {
    let Some(batch) = batch else {
        return f();
    };
    let previous = ACTIVE.with(|a| {
        a.borrow_mut().replace(Scope {
            batch,
            row_offset: 0,
        })
    });
    let _restore = Restore(previous);
    f()
}

/// The active batch's rows in runs of one adapter (its slot in the batch's stack;
/// `None`: rows without one), covering every row in order; `None` outside a LoRA batch.
pub(crate) fn adapter_runs() -> Option<Vec<(Range<usize>, Option<usize>)>> {
    ACTIVE.with(|a| {
        let active = a.borrow();
        let batch = &active.as_ref()?.batch;
        let mut runs = Vec::with_capacity(2 * batch.runs.len() + 1);
        let mut covered = 0;
        for (rows, slot) in &batch.runs {
            if rows.start > covered {
                runs.push((covered..rows.start, None));
            }
            runs.push((rows.clone(), Some(*slot)));
            covered = rows.end;
        }
        if batch.rows > covered {
            runs.push((covered..batch.rows, None));
        }
        Some(runs)
    })
}

/// Runs `f` (over an input of `rows` rows, such as a table every sequence shares)
/// with all its rows adapted by the adapter in `slot` of the active batch's stack;
/// plain when no batch is active.
pub(crate) fn with_single_adapter<R>(slot: usize, rows: usize, f: impl FnOnce() -> R) -> R {
    let stack = ACTIVE.with(|a| a.borrow().as_ref().map(|s| s.batch.stack.clone()));
    let batch = stack.map(|stack| BatchAdapters {
        stack,
        runs: vec![(0..rows, slot)],
        rows,
    });
    scoped(batch, f)
}

/// Runs `f` on rows `start..` of the current layer input (a row slice of the batch).
pub(crate) fn offset_rows<R>(start: usize, f: impl FnOnce() -> R) -> R {
    let shifted = ACTIVE.with(|a| match a.borrow_mut().as_mut() {
        Some(scope) => {
            scope.row_offset += start;
            true
        }
        None => false,
    });
    let result = f();
    if shifted {
        ACTIVE.with(|a| {
            if let Some(s) = a.borrow_mut().as_mut() {
                s.row_offset -= start;
            }
        });
    }
    result
}

/// `base()` (the layer's `x W^T`) plus each row's adapter update for layer
/// `target`, or `None` when no row of `x` is adapted there (the caller runs the
/// plain layer). On CUDA, `weight_t` (`W^T`, a view of the stored weight) lets the
/// layer's own GEMM add `x W^T` onto the update instead of calling `base`.
///
/// Rows sharing an adapter form a segment (the runner orders sequences by adapter),
/// and each segment gets only its own adapter's `x A^T B^T`, read as views of the
/// layer's stacked factors. On CUDA the shrink runs once over all the stacked
/// columns (one wide GEMM keeps the GPU busy, one thin GEMM per segment did not) and
/// each segment expands its own columns; the CPU runs both per segment. Before, one
/// gathered product over all the stacked columns, masked per row, expanded with 8
/// times the work for 8 adapters. Rows of the base model, and of adapters that leave
/// the layer alone, get no update.
pub(crate) fn adapted_matmul(
    target: TargetId,
    x: &Tensor,
    weight_t: Option<&Tensor>,
    base: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let found = ACTIVE.with(|a| -> Result<Option<(Vec<LoraSegment>, Tensor, Tensor)>> {
        let active = a.borrow();
        let Some(scope) = active.as_ref() else {
            return Ok(None);
        };
        let Some(layer) = scope
            .batch
            .stack
            .layers
            .get(target.0)
            .and_then(Option::as_ref)
        else {
            return Ok(None);
        };
        let n = x.dim(0)?;
        let rows = scope.row_offset..scope.row_offset + n;
        if rows.end > scope.batch.rows {
            return Err(candle_core::Error::Msg(format!(
                "internal: LoRA rows {rows:?} outside the batch's {}",
                scope.batch.rows
            ))
            .into());
        }
        let segments = scope.batch.segments(rows, layer);
        Ok((!segments.is_empty()).then(|| (segments, layer.a_t.clone(), layer.b_t.clone())))
    })?;
    let Some((segments, a_t, b_t)) = found else {
        return Ok(None);
    };
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 2 {
        // The update first, then the layer's GEMM adds onto it (beta 1). That GEMM is
        // compute-bound, so reading the update in its epilogue costs little, where
        // adding the update after it reads and writes the whole output once more.
        let update = crate::layers::segmented_low_rank(x, &a_t, &b_t, &segments)?;
        return Ok(Some(match weight_t {
            Some(w_t) => {
                crate::layers::add_matmul_in_place(&update, x, w_t)?;
                update
            }
            None => (base()? + update)?,
        }));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = weight_t;
    let n = x.dim(0)?;
    let out = b_t.dim(1)?;
    let zeros = |rows: usize| Tensor::zeros((rows, out), x.dtype(), x.device());
    let mut pieces = Vec::with_capacity(2 * segments.len() + 1);
    let mut done = 0;
    for seg in &segments {
        if seg.rows.start > done {
            pieces.push(zeros(seg.rows.start - done)?);
        }
        let a = a_t
            .narrow(1, seg.columns.start, seg.columns.len())?
            .contiguous()?;
        let b = b_t.narrow(0, seg.columns.start, seg.columns.len())?;
        let u = x.narrow(0, seg.rows.start, seg.rows.len())?.matmul(&a)?;
        pieces.push(u.matmul(&b)?);
        done = seg.rows.end;
    }
    if n > done {
        pieces.push(zeros(n - done)?);
    }
    Ok(Some((base()? + Tensor::cat(&pieces, 0)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tensor(rows: usize, cols: usize, seed: f32) -> Tensor {
        let values = (0..rows * cols)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    fn adapter(id: u64, rank: usize, layers: Vec<Option<(Tensor, Tensor)>>) -> Arc<LoraAdapter> {
        let layers = layers
            .into_iter()
            .map(|l| {
                l.map(|(a, b)| LowRank {
                    a_t: a.t().unwrap().contiguous().unwrap(),
                    b_t: b.t().unwrap().contiguous().unwrap(),
                })
            })
            .collect();
        Arc::new(LoraAdapter {
            id,
            info: LoraInfo {
                name: format!("a{id}"),
                path: PathBuf::new(),
                rank,
                adapted_layers: 1,
                num_labels: 2,
                id2label: None,
                has_head: false,
            },
            layers,
            head: None,
        })
    }

    fn assert_close(got: &Tensor, want: &[Vec<f32>]) {
        let got = got.to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// Rows of base, adapter 1, adapter 2 (other ranks; no update on layer 1) and
    /// adapter 1 again, in row chunks too, with the factors stacked for the batch
    /// and from a registry stack that also holds an adapter the batch does not use:
    /// each row gets `x W^T` plus its own adapter's `x A^T B^T`.
    #[test]
    fn each_row_gets_its_own_adapters_update() {
        let (inp, out) = (5, 3);
        let x = tensor(7, inp, 0.1);
        let w = tensor(out, inp, 0.7);
        let (a1, b1) = (tensor(2, inp, 1.1), tensor(out, 2, 1.9));
        let (a2, b2) = (tensor(3, inp, 2.3), tensor(out, 3, 2.9));
        let one = adapter(1, 2, vec![Some((a1.clone(), b1.clone())), None]);
        let two = adapter(2, 3, vec![Some((a2.clone(), b2.clone())), None]);
        let idle = adapter(
            3,
            2,
            vec![Some((tensor(2, inp, 3.1), tensor(out, 2, 3.3))), None],
        );
        let seqs = [(None, 2), (Some(&one), 2), (Some(&two), 2), (Some(&one), 1)];
        let base = || Ok(x.matmul(&w.t()?)?);
        let update = |rows: std::ops::Range<usize>, a: &Tensor, b: &Tensor| {
            x.narrow(0, rows.start, rows.len())
                .unwrap()
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
        };
        let zeros = Tensor::zeros((2, out), DType::F32, &Device::Cpu).unwrap();
        let want = (base().unwrap()
            + Tensor::cat(
                &[
                    zeros,
                    update(2..4, &a1, &b1),
                    update(4..6, &a2, &b2),
                    update(6..7, &a1, &b1),
                ],
                0,
            )
            .unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        let registry_stack =
            Arc::new(LoraStack::build(vec![idle.clone(), two.clone(), one.clone()]).unwrap());
        // The registry's stack lacks adapter 2 (unloaded while its request waited).
        let stale_stack = Arc::new(LoraStack::build(vec![idle, one.clone()]).unwrap());
        for loaded in [None, Some(&registry_stack), Some(&stale_stack)] {
            let batch = BatchAdapters::for_sequences(loaded, seqs)
                .unwrap()
                .expect("adapters");
            scoped(Some(batch), || {
                let got = adapted_matmul(TargetId(0), &x, None, base)
                    .unwrap()
                    .expect("adapted rows");
                assert_close(&got, &want);
                // Rows 4.. as a chunk of their own.
                let chunk = x.narrow(0, 4, 3).unwrap();
                let chunk_base = || Ok(chunk.matmul(&w.t()?)?);
                let got = offset_rows(4, || adapted_matmul(TargetId(0), &chunk, None, chunk_base))
                    .unwrap()
                    .expect("adapted rows");
                assert_close(&got, &want[4..]);
                // Only the base rows, or a layer no adapter targets: the plain layer.
                let base_rows = x.narrow(0, 0, 2).unwrap();
                let rows_base = || Ok(base_rows.matmul(&w.t()?)?);
                assert!(adapted_matmul(TargetId(0), &base_rows, None, rows_base)
                    .unwrap()
                    .is_none());
                assert!(adapted_matmul(TargetId(1), &x, None, base)
                    .unwrap()
                    .is_none());
            });
        }
        assert!(adapted_matmul(TargetId(0), &x, None, base)
            .unwrap()
            .is_none());
        let base_only = [(None, 3)];
        assert!(
            BatchAdapters::for_sequences(Some(&registry_stack), base_only)
                .unwrap()
                .is_none()
        );
    }
}
