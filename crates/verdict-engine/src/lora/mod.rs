//! LoRA adapters (PEFT format) served on one base model.
//!
//! While the backbone loads, every linear layer an adapter may target registers a
//! [`TargetSpec`]: its PEFT module names and which of its output rows each one
//! produces (a packed QKV weight holds `q_proj`, `k_proj` and `v_proj`; a split
//! fused `qkv_proj` gives each of its three layers a slice of one module). An
//! adapter is loaded against that list into one low-rank pair per layer, `x A^T B^T`
//! with the scaling folded into `B`.
//!
//! A batch may mix adapters and the base model: the runner orders its sequences so
//! each adapter's tokens are one contiguous row range, and scopes the forward pass
//! with those ranges ([`scoped`]). Each targeted layer then adds, per range, the
//! product of that range's rows with its adapter's pair; rows of the base model and
//! of adapters that leave the layer alone get nothing. The scope is the engine
//! thread's own, so the model code keeps its signatures.

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

/// `x A^T B^T` for one layer: `a_t` `[in, R]`, `b_t` `[R, out]` with the scaling in it.
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

/// Rows of a packed batch that run with one adapter.
#[derive(Debug, Clone)]
pub struct Segment {
    pub adapter: Arc<LoraAdapter>,
    pub rows: Range<usize>,
}

struct Scope {
    segments: Vec<Segment>,
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

/// Runs `f` (a forward pass over a packed batch) with `segments` applied; with no
/// segments it runs as the plain model.
pub fn scoped<R>(segments: Vec<Segment>, f: impl FnOnce() -> R) -> R {
    if segments.is_empty() {
        return f();
    }
    let previous = ACTIVE.with(|a| {
        a.borrow_mut().replace(Scope {
            segments,
            row_offset: 0,
        })
    });
    let _restore = Restore(previous);
    f()
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

/// The adapters' update of layer `target` for input rows `x` `[n, in]`, or `None`
/// when no row of the current scope is adapted there.
pub(crate) fn delta(target: TargetId, x: &Tensor) -> Result<Option<Tensor>> {
    ACTIVE.with(|a| {
        let active = a.borrow();
        let Some(scope) = active.as_ref() else {
            return Ok(None);
        };
        let n = x.dim(0)?;
        let (lo, hi) = (scope.row_offset, scope.row_offset + n);
        let mut pieces: Vec<Tensor> = Vec::new();
        let mut cursor = lo;
        let mut out_dim = 0;
        for seg in &scope.segments {
            let Some(pair) = seg.adapter.layers.get(target.0).and_then(Option::as_ref) else {
                continue;
            };
            let (start, end) = (seg.rows.start.max(lo), seg.rows.end.min(hi));
            if start >= end {
                continue;
            }
            out_dim = pair.b_t.dim(1)?;
            if start > cursor {
                pieces.push(Tensor::zeros(
                    (start - cursor, out_dim),
                    x.dtype(),
                    x.device(),
                )?);
            }
            let rows = x.narrow(0, start - lo, end - start)?;
            pieces.push(rows.matmul(&pair.a_t)?.matmul(&pair.b_t)?);
            cursor = end;
        }
        if pieces.is_empty() {
            return Ok(None);
        }
        if cursor < hi {
            pieces.push(Tensor::zeros(
                (hi - cursor, out_dim),
                x.dtype(),
                x.device(),
            )?);
        }
        Ok(Some(if pieces.len() == 1 {
            pieces.swap_remove(0)
        } else {
            Tensor::cat(&pieces, 0)?
        }))
    })
}
