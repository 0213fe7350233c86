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
//! with the adapter of every token row ([`scoped`]). Each targeted layer then runs
//! one gathered product for all of them ([`adapted_matmul`]): rows of the base
//! model, and of adapters that leave the layer alone, get no update. The scope is
//! the engine thread's own, so the model code keeps its signatures.

mod config;
mod registry;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

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

/// `x A^T B^T` for one layer: `a_t` `[in, R]`, and B with the scaling in it in both
/// layouts a layer's weight may have (`b` `[out, R]`, `b_t` `[R, out]`).
#[derive(Debug, Clone)]
struct LowRank {
    a_t: Tensor,
    b: Tensor,
    b_t: Tensor,
}

/// A layer's weight as it is stored.
pub(crate) enum WeightRef<'a> {
    /// `[out, in]`.
    OutIn(&'a Tensor),
    /// `[in, out]`.
    InOut(&'a Tensor),
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

/// Marks rows that run with the base model.
const BASE_ROW: u32 = u32::MAX;

/// The adapters of a packed batch: which adapter each token row runs with.
#[derive(Debug, Clone)]
pub struct BatchAdapters {
    /// The distinct adapters, in order of first appearance.
    adapters: Vec<Arc<LoraAdapter>>,
    /// Per batch row: its adapter's index in `adapters`, or `BASE_ROW`.
    row_slots: Vec<u32>,
}

impl BatchAdapters {
    /// From each sequence's adapter and token count; `None` when no sequence has one.
    pub fn for_sequences<'a>(
        seqs: impl IntoIterator<Item = (Option<&'a Arc<LoraAdapter>>, usize)>,
    ) -> Option<Self> {
        let mut adapters: Vec<Arc<LoraAdapter>> = Vec::new();
        let mut row_slots = Vec::new();
        for (adapter, rows) in seqs {
            let slot = match adapter {
                None => BASE_ROW,
                Some(a) => match adapters.iter().position(|b| b.id == a.id) {
                    Some(i) => i as u32,
                    None => {
                        adapters.push(a.clone());
                        (adapters.len() - 1) as u32
                    }
                },
            };
            row_slots.extend(std::iter::repeat_n(slot, rows));
        }
        (!adapters.is_empty()).then_some(BatchAdapters {
            adapters,
            row_slots,
        })
    }
}

/// Column layout of a layer's gathered low-rank factors: (adapter slot, rank) in order.
type Layout = Vec<(u32, usize)>;

struct Scope {
    batch: BatchAdapters,
    /// Row of the batch that row 0 of the current layer input is (row-chunked MLPs).
    row_offset: usize,
    /// `[T, sum of ranks]` 0/1 masks, one per column layout and dtype: row r keeps
    /// only the columns of its own adapter.
    masks: RefCell<HashMap<(Layout, DType), Tensor>>,
    /// `row_slots` as a `[T, 1]` tensor on the model's device.
    device_rows: RefCell<Option<Tensor>>,
}

impl Scope {
    fn mask(&self, layout: &Layout, dtype: DType, device: &Device) -> Result<Tensor> {
        let key = (layout.clone(), dtype);
        if let Some(mask) = self.masks.borrow().get(&key) {
            return Ok(mask.clone());
        }
        // Built on the device from the row and column slots (a few KB to copy):
        // the mask itself is rows x columns.
        let rows = match self.device_rows.borrow().as_ref() {
            Some(rows) => rows.clone(),
            None => {
                let slots = &self.batch.row_slots;
                Tensor::from_slice(slots, (slots.len(), 1), device)?
            }
        };
        self.device_rows.replace(Some(rows.clone()));
        let columns: Vec<u32> = layout
            .iter()
            .flat_map(|&(slot, rank)| std::iter::repeat_n(slot, rank))
            .collect();
        let width = columns.len();
        let columns = Tensor::from_vec(columns, (1, width), device)?;
        let mask = rows
            .broadcast_eq(&columns)?
            .to_dtype(DType::F32)?
            .to_dtype(dtype)?;
        self.masks.borrow_mut().insert(key, mask.clone());
        Ok(mask)
    }
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
            masks: RefCell::new(HashMap::new()),
            device_rows: RefCell::new(None),
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

/// `x W^T` plus each row's adapter update for layer `target`, or `None` when no
/// row of `x` is adapted there (the caller runs the plain layer).
///
/// One gathered product for all the batch's adapters: `U = (x A_all) * mask`
/// (`A_all` the adapters' A stacked, the mask keeping each row's own columns),
/// then `[x | U] [W | B_all]^T`, so the update lands in the layer's own matmul
/// instead of a second pass over its output, and the kernel count does not grow
/// with the number of adapters.
pub(crate) fn adapted_matmul(
    target: TargetId,
    x: &Tensor,
    weight: WeightRef,
) -> Result<Option<Tensor>> {
    ACTIVE.with(|a| {
        let active = a.borrow();
        let Some(scope) = active.as_ref() else {
            return Ok(None);
        };
        let mut layout: Layout = Vec::new();
        let mut a_parts = Vec::new();
        let mut b_parts = Vec::new();
        for (slot, adapter) in scope.batch.adapters.iter().enumerate() {
            if let Some(pair) = adapter.layers.get(target.0).and_then(Option::as_ref) {
                layout.push((slot as u32, pair.b_t.dim(0)?));
                a_parts.push(&pair.a_t);
                b_parts.push(match weight {
                    WeightRef::OutIn(_) => &pair.b,
                    WeightRef::InOut(_) => &pair.b_t,
                });
            }
        }
        let n = x.dim(0)?;
        let rows = scope
            .batch
            .row_slots
            .get(scope.row_offset..scope.row_offset + n)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "internal: LoRA rows {}..{} outside the batch's {}",
                    scope.row_offset,
                    scope.row_offset + n,
                    scope.batch.row_slots.len()
                ))
            })?;
        // Every adapter of the batch has rows in it: only a row slice (a CPU MLP
        // chunk) can miss the layout's adapters.
        let whole = n == scope.batch.row_slots.len();
        if layout.is_empty()
            || (!whole
                && !rows
                    .iter()
                    .any(|r| layout.iter().any(|(slot, _)| slot == r)))
        {
            return Ok(None);
        }
        let mask = scope
            .mask(&layout, x.dtype(), x.device())?
            .narrow(0, scope.row_offset, n)?;
        let a_all = Tensor::cat(&a_parts, 1)?;
        let u = (x.matmul(&a_all)? * mask)?;
        let x_aug = Tensor::cat(&[x, &u], 1)?;
        // Both concatenations join contiguous blocks, in the weight's own layout.
        Ok(Some(match weight {
            WeightRef::OutIn(w) => {
                let w_aug = Tensor::cat(&[w, &Tensor::cat(&b_parts, 1)?], 1)?;
                x_aug.matmul(&w_aug.t()?)?
            }
            WeightRef::InOut(wt) => {
                let w_aug = Tensor::cat(&[wt, &Tensor::cat(&b_parts, 0)?], 0)?;
                x_aug.matmul(&w_aug)?
            }
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    b,
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

    /// Rows of base, adapter 1, adapter 2 (other ranks; no update on layer 1) and
    /// adapter 1 again, in both weight layouts and in row chunks: each row gets
    /// `x W^T` plus its own adapter's `x A^T B^T`.
    #[test]
    fn each_row_gets_its_own_adapters_update() {
        let (inp, out) = (5, 3);
        let x = tensor(7, inp, 0.1);
        let w = tensor(out, inp, 0.7);
        let (a1, b1) = (tensor(2, inp, 1.1), tensor(out, 2, 1.9));
        let (a2, b2) = (tensor(3, inp, 2.3), tensor(out, 3, 2.9));
        let one = adapter(1, 2, vec![Some((a1.clone(), b1.clone())), None]);
        let two = adapter(2, 3, vec![Some((a2.clone(), b2.clone())), None]);
        let seqs = [(None, 2), (Some(&one), 2), (Some(&two), 2), (Some(&one), 1)];
        let batch = BatchAdapters::for_sequences(seqs).expect("adapters");
        let base = x.matmul(&w.t().unwrap()).unwrap();
        let update = |rows: std::ops::Range<usize>, a: &Tensor, b: &Tensor| {
            x.narrow(0, rows.start, rows.len())
                .unwrap()
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
        };
        let zeros = Tensor::zeros((2, out), DType::F32, &Device::Cpu).unwrap();
        let want = (base
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
        let w_t = w.t().unwrap().contiguous().unwrap();
        scoped(Some(batch), || {
            for weight in [WeightRef::OutIn(&w), WeightRef::InOut(&w_t)] {
                let got = adapted_matmul(TargetId(0), &x, weight)
                    .unwrap()
                    .expect("adapted rows");
                let got = got.to_vec2::<f32>().unwrap();
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
                }
            }
            // Rows 4.. as a chunk of their own.
            let chunk = x.narrow(0, 4, 3).unwrap();
            let got = offset_rows(4, || {
                adapted_matmul(TargetId(0), &chunk, WeightRef::OutIn(&w))
            })
            .unwrap()
            .expect("adapted rows")
            .to_vec2::<f32>()
            .unwrap();
            for (g, w) in got.iter().flatten().zip(want[4..].iter().flatten()) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
            // Only the base rows, or a layer no adapter targets: the plain layer.
            let base_rows = x.narrow(0, 0, 2).unwrap();
            assert!(
                adapted_matmul(TargetId(0), &base_rows, WeightRef::OutIn(&w))
                    .unwrap()
                    .is_none()
            );
            assert!(adapted_matmul(TargetId(1), &x, WeightRef::OutIn(&w))
                .unwrap()
                .is_none());
        });
        assert!(adapted_matmul(TargetId(0), &x, WeightRef::OutIn(&w))
            .unwrap()
            .is_none());
    }
}
