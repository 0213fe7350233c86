//! Loading, listing and unloading the adapters of one base model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};

use super::{
    AdapterConfig, AdapterHead, LoraAdapter, LoraInfo, LoraStack, LowRank, TargetModules,
    TargetSpec,
};
use crate::checkpoint::{HfConfig, ModelFiles, Weights};
use crate::error::{EngineError, Result};
use crate::models::{self, ArchInfo};
use crate::pooling::Activation;

/// PEFT's prefix on every tensor of a saved adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// `--max-loras` and `--max-lora-rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraLimits {
    /// Adapters loaded at once (all stay resident; a batch may use any of them).
    pub max_loras: usize,
    pub max_rank: usize,
}

impl Default for LoraLimits {
    /// vLLM's defaults.
    fn default() -> Self {
        LoraLimits {
            max_loras: 1,
            max_rank: 16,
        }
    }
}

/// What loading an adapter needs of the base model.
pub(crate) struct BaseModel {
    pub files: ModelFiles,
    pub arch: ArchInfo,
    /// The base's `config.json`, for the heads that read it (ModernBERT's).
    pub config: HfConfig,
    pub hidden: usize,
    pub dtype: DType,
    pub device: Device,
    pub num_labels: usize,
    pub id2label: Option<BTreeMap<usize, String>>,
    pub activation: Activation,
}

/// The adapters of one engine, shared by the API layers (which resolve names) and
/// runtime loading; sequences hold their adapter, so unloading never fails a
/// request already queued.
pub struct LoraRegistry {
    base: BaseModel,
    targets: Vec<TargetSpec>,
    /// module name -> (target index, part index) of every layer computing part of it.
    modules: HashMap<String, Vec<(usize, usize)>>,
    limits: LoraLimits,
    adapters: RwLock<Vec<Arc<LoraAdapter>>>,
    /// The loaded adapters' factors stacked per layer, rebuilt with every change.
    stack: RwLock<Arc<LoraStack>>,
    next_id: AtomicU64,
}

impl LoraRegistry {
    pub(crate) fn new(base: BaseModel, targets: Vec<TargetSpec>, limits: LoraLimits) -> Self {
        let mut modules: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (t, spec) in targets.iter().enumerate() {
            for (p, part) in spec.parts.iter().enumerate() {
                modules.entry(part.module.clone()).or_default().push((t, p));
            }
        }
        LoraRegistry {
            base,
            targets,
            modules,
            limits,
            adapters: RwLock::new(Vec::new()),
            stack: RwLock::new(Arc::new(LoraStack::default())),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn limits(&self) -> LoraLimits {
        self.limits
    }

    /// The adapter served under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.read().iter().find(|a| a.info.name == name).cloned()
    }

    /// Every loaded adapter, in load order.
    pub fn list(&self) -> Vec<LoraInfo> {
        self.read().iter().map(|a| a.info.clone()).collect()
    }

    /// Loads the PEFT adapter in `path` under `name`.
    pub fn load(&self, name: &str, path: &Path) -> Result<LoraInfo> {
        if name.is_empty() {
            return Err(EngineError::validation("the LoRA adapter name is empty"));
        }
        if self.get(name).is_some() {
            return Err(EngineError::validation(format!(
                "The lora adapter '{name}' has already been loaded."
            )));
        }
        let adapter = self
            .read_adapter(name, path)
            .map_err(|e| adapter_error(name, path, e))?;
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if adapters.iter().any(|a| a.info.name == name) {
            return Err(EngineError::validation(format!(
                "The lora adapter '{name}' has already been loaded."
            )));
        }
        if adapters.len() >= self.limits.max_loras {
            return Err(EngineError::validation(format!(
                "cannot load LoRA adapter '{name}': {} adapters are loaded and --max-loras is {}",
                adapters.len(),
                self.limits.max_loras
            )));
        }
        let info = adapter.info.clone();
        adapters.push(Arc::new(adapter));
        self.restack(&adapters)?;
        Ok(info)
    }

    /// Removes an adapter; requests that already hold it finish with it.
    pub fn unload(&self, name: &str) -> Result<()> {
        let mut adapters = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        let before = adapters.len();
        adapters.retain(|a| a.info.name != name);
        if adapters.len() == before {
            return Err(EngineError::NotFound(format!(
                "The lora adapter '{name}' cannot be found."
            )));
        }
        self.restack(&adapters)
    }

    /// The loaded adapters' stacked factors, for a batch to run with.
    pub fn stack(&self) -> Arc<LoraStack> {
        self.stack.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuilds the stack; called with the adapter list's write lock held, so
    /// stacks follow the list in order.
    fn restack(&self, adapters: &[Arc<LoraAdapter>]) -> Result<()> {
        let stack = LoraStack::build(adapters.to_vec())?;
        *self.stack.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(stack);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<LoraAdapter>>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_adapter(&self, name: &str, dir: &Path) -> Result<LoraAdapter> {
        if !dir.is_dir() {
            return Err(EngineError::NotFound("no such adapter directory".into()));
        }
        let config = AdapterConfig::load(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() {
            return Err(EngineError::NotFound(format!(
                "{} not found (PEFT adapters are read from adapter_model.safetensors)",
                file.display()
            )));
        }
        let base = &self.base;
        let (mut weights, own) =
            Weights::open_overlay(&base.files, &file, PEFT_PREFIX, base.dtype, &base.device)?;
        self.check_target_names(&config, &weights)?;

        // Sort the adapter's tensors into LoRA pairs and head weights.
        let mut pairs: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        let mut head_tensors = Vec::new();
        for tensor in &own {
            if let Some(module) = tensor.strip_suffix(".lora_A.weight") {
                pairs.entry(module.to_string()).or_default().0 = true;
            } else if let Some(module) = tensor.strip_suffix(".lora_B.weight") {
                pairs.entry(module.to_string()).or_default().1 = true;
            } else if tensor.contains("lora_magnitude_vector") {
                return Err(EngineError::Config(
                    "DoRA adapters (lora_magnitude_vector) are not supported".into(),
                ));
            } else if tensor.contains("lora_embedding_") {
                return Err(EngineError::Config(format!(
                    "`{tensor}`: LoRA on embedding layers is not supported"
                )));
            } else if models::is_head_weight(&base.arch, tensor) {
                head_tensors.push(tensor.clone());
            } else {
                return Err(EngineError::Config(format!(
                    "the adapter saves `{tensor}`: modules_to_save may only replace the \
                     classification head (and BERT's pooler); other modules are shared by every adapter"
                )));
            }
        }

        // Each layer's pieces: (part index, A [r, in] f32, scaled B rows [len, r] f32).
        let mut pieces: Vec<Vec<(usize, Tensor, Tensor)>> = vec![Vec::new(); self.targets.len()];
        let mut max_rank = 0;
        // Head layers the adapter adapts (PEFT's `all-linear` takes a pooler's or
        // head's dense): each head is the adapter's own, so the update is merged in.
        let mut merged_head = Vec::new();
        for (module, &(has_a, has_b)) in &pairs {
            if !(has_a && has_b) {
                return Err(EngineError::Weight(format!(
                    "module `{module}` has only one of lora_A / lora_B"
                )));
            }
            if !config.target_modules.matches(module) {
                return Err(EngineError::Config(format!(
                    "the adapter has weights for `{module}`, which its target_modules do not name"
                )));
            }
            let a_name = format!("{module}.lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            let head_weight = format!("{module}.weight");
            let (places, in_dim, module_out) = match self.modules.get(module) {
                Some(places) => {
                    let (in_dim, out) = self.module_dims(places);
                    (Some(places), in_dim, out)
                }
                None => match self.head_linear_dims(&weights, &head_weight) {
                    Some((out, in_dim)) => (None, in_dim, out),
                    None => {
                        return Err(EngineError::Config(format!(
                            "target module `{module}` is not a linear layer of this model that LoRA can adapt"
                        )))
                    }
                },
            };
            let rank = weights
                .shape_of(&a_name)
                .and_then(|s| s.first().copied())
                .unwrap_or(0);
            if rank == 0 {
                return Err(EngineError::Weight(format!("`{a_name}` has no rank")));
            }
            if rank > self.limits.max_rank {
                return Err(EngineError::validation(format!(
                    "LoRA rank {rank} of `{module}` is greater than --max-lora-rank {}",
                    self.limits.max_rank
                )));
            }
            max_rank = max_rank.max(rank);
            let a = weights.load_exact(&a_name, Some(&[rank, in_dim]), DType::F32)?;
            let b = weights.load_exact(&b_name, Some(&[module_out, rank]), DType::F32)?;
            let b = (b * config.scaling(module, rank))?;
            let Some(places) = places else {
                let w =
                    weights.load_exact(&head_weight, Some(&[module_out, in_dim]), DType::F32)?;
                merged_head.push((head_weight, (w + b.matmul(&a)?)?));
                continue;
            };
            for &(t, p) in places {
                let rows = self.targets[t].parts[p].module_rows.clone();
                pieces[t].push((p, a.clone(), b.narrow(0, rows.start, rows.len())?));
            }
        }
        if pairs.is_empty() && head_tensors.is_empty() {
            return Err(EngineError::Weight(
                "the adapter has no LoRA weights and no head".into(),
            ));
        }
        let mut layers = Vec::with_capacity(self.targets.len());
        let mut adapted_layers = 0;
        for (spec, parts) in self.targets.iter().zip(pieces) {
            if parts.is_empty() {
                layers.push(None);
                continue;
            }
            adapted_layers += 1;
            layers.push(Some(low_rank(spec, parts, base.dtype, &base.device)?));
        }

        let has_head = !(head_tensors.is_empty() && merged_head.is_empty());
        for (name, merged) in merged_head {
            weights.replace(&name, merged)?;
        }
        let head = if has_head {
            Some(self.adapter_head(dir, &weights)?)
        } else {
            None
        };
        drop(weights);
        let (num_labels, id2label) = match &head {
            Some((h, labels)) => (h.head.num_labels(), labels.clone()),
            None => (base.num_labels, base.id2label.clone()),
        };
        let info = LoraInfo {
            name: name.to_string(),
            path: dir.to_path_buf(),
            rank: max_rank,
            adapted_layers,
            num_labels,
            id2label,
            has_head: head.is_some(),
        };
        Ok(LoraAdapter {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            info,
            layers,
            head: head.map(|(h, _)| h),
        })
    }

    /// Input size and output rows of a module, from the layers that compute it.
    fn module_dims(&self, places: &[(usize, usize)]) -> (usize, usize) {
        let in_dim = places.first().map_or(0, |&(t, _)| self.targets[t].in_dim);
        let out = places
            .iter()
            .map(|&(t, p)| self.targets[t].parts[p].module_rows.end)
            .max()
            .unwrap_or(0);
        (in_dim, out)
    }

    /// `[out, in]` when `weight` is a 2-D weight of the model's classification head.
    fn head_linear_dims(&self, weights: &Weights, weight: &str) -> Option<(usize, usize)> {
        if !models::is_head_weight(&self.base.arch, weight) {
            return None;
        }
        match weights.shape_of(weight)? {
            &[out, inp] => Some((out, inp)),
            _ => None,
        }
    }

    /// Every listed target name must exist in this model (PEFT would have refused it too).
    fn check_target_names(&self, config: &AdapterConfig, weights: &Weights) -> Result<()> {
        if let TargetModules::Names(names) = &config.target_modules {
            let head_modules: Vec<&str> = weights
                .names()
                .filter(|w| self.head_linear_dims(weights, w).is_some())
                .filter_map(|w| w.strip_suffix(".weight"))
                .collect();
            for name in names {
                let single = TargetModules::Names(vec![name.clone()]);
                let mut modules = self
                    .modules
                    .keys()
                    .map(String::as_str)
                    .chain(head_modules.iter().copied());
                if !modules.any(|m| single.matches(m)) {
                    return Err(EngineError::Config(format!(
                        "target module `{name}` is not a linear layer of this model that LoRA can adapt \
                         (LoRA-capable modules are named like `{}`)",
                        self.example_modules()
                    )));
                }
            }
        }
        Ok(())
    }

    fn example_modules(&self) -> String {
        let mut names: Vec<&str> = self
            .modules
            .keys()
            .filter_map(|m| m.rsplit('.').next())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.join("`, `")
    }

    /// The adapter's head (weights it saved over the model's), with its labels from
    /// an optional `config.json` beside the adapter.
    fn adapter_head(
        &self,
        dir: &Path,
        weights: &Weights,
    ) -> Result<(AdapterHead, Option<BTreeMap<usize, String>>)> {
        let base = &self.base;
        let head = models::load_adapter_head(&base.arch, &base.config, weights, base.hidden)?;
        let num_labels = head.num_labels();
        let label_config = dir.join("config.json");
        let (id2label, activation) = if label_config.is_file() {
            let cfg = HfConfig::load(&label_config, None)?;
            let labels = cfg
                .get("id2label")
                .is_some()
                .then(|| cfg.id2label())
                .flatten();
            if let Some(l) = &labels {
                if l.len() != num_labels {
                    return Err(EngineError::Config(format!(
                        "{}: id2label has {} labels but the adapter's head has {num_labels}",
                        label_config.display(),
                        l.len()
                    )));
                }
            }
            let labels = labels.or_else(|| default_labels(base, num_labels));
            (labels, Activation::from_config(&cfg)?)
        } else {
            (default_labels(base, num_labels), base.activation)
        };
        Ok((AdapterHead { head, activation }, id2label))
    }
}

/// One pair for a layer from its modules' pieces: A stacked over the pieces'
/// ranks, B block-structured so each piece writes only its own output rows.
fn low_rank(
    spec: &TargetSpec,
    parts: Vec<(usize, Tensor, Tensor)>,
    dtype: DType,
    device: &Device,
) -> Result<LowRank> {
    let total_rank: usize = parts
        .iter()
        .map(|(_, a, _)| a.dim(0))
        .sum::<candle_core::Result<_>>()?;
    let mut b_t = vec![0f32; total_rank * spec.out_dim];
    let mut a_rows = Vec::with_capacity(parts.len());
    let mut col = 0;
    for (p, a, b) in parts {
        let rank = a.dim(0)?;
        let offset = spec.parts[p].offset;
        let b = b.to_vec2::<f32>()?;
        for (row, values) in b.iter().enumerate() {
            for (k, v) in values.iter().enumerate() {
                b_t[(col + k) * spec.out_dim + offset + row] = *v;
            }
        }
        a_rows.push(a);
        col += rank;
    }
    let a = Tensor::cat(&a_rows, 0)?;
    let b_t = Tensor::from_vec(b_t, (total_rank, spec.out_dim), &Device::Cpu)?;
    let on_device =
        |t: Tensor| -> Result<Tensor> { Ok(t.contiguous()?.to_dtype(dtype)?.to_device(device)?) };
    Ok(LowRank {
        a_t: on_device(a.t()?)?,
        b_t: on_device(b_t)?,
    })
}

/// The model's labels when the head keeps their number, else transformers' `LABEL_i`.
fn default_labels(base: &BaseModel, num_labels: usize) -> Option<BTreeMap<usize, String>> {
    if num_labels == base.num_labels {
        return base.id2label.clone();
    }
    Some((0..num_labels).map(|i| (i, format!("LABEL_{i}"))).collect())
}

/// Load errors name the adapter and its directory; a client's bad name or path
/// stays a client error.
fn adapter_error(name: &str, path: &Path, e: EngineError) -> EngineError {
    let context = format!("LoRA adapter '{name}' ({})", path.display());
    match e {
        EngineError::Validation { message, param } => EngineError::Validation {
            message: format!("{context}: {message}"),
            param,
        },
        EngineError::NotFound(msg) => EngineError::NotFound(format!("{context}: {msg}")),
        EngineError::Config(msg) => EngineError::Config(format!("{context}: {msg}")),
        EngineError::Weight(msg) => EngineError::Weight(format!("{context}: {msg}")),
        other => EngineError::Weight(format!("{context}: {other}")),
    }
}

/// A `--lora-modules` entry: `name=path`, or vLLM's JSON form
/// `{"name": ..., "path": ..., "base_model_name": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModuleArg {
    pub name: String,
    pub path: PathBuf,
}

impl LoraModuleArg {
    pub fn parse(arg: &str) -> Result<Self> {
        let bad = |why: &str| {
            EngineError::Config(format!(
                "--lora-modules `{arg}`: {why} (expected name=path or {{\"name\": ..., \"path\": ...}})"
            ))
        };
        if arg.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(arg).map_err(|_| bad("not valid JSON"))?;
            let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
            let (Some(name), Some(path)) = (field("name"), field("path")) else {
                return Err(bad("`name` and `path` are required"));
            };
            return Ok(LoraModuleArg {
                name: name.to_string(),
                path: PathBuf::from(path),
            });
        }
        let (name, path) = arg.split_once('=').ok_or_else(|| bad("no `=`"))?;
        if name.is_empty() || path.is_empty() {
            return Err(bad("empty name or path"));
        }
        Ok(LoraModuleArg {
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::TargetPart;

    fn tensor(rows: usize, cols: usize, seed: f32) -> Tensor {
        let values = (0..rows * cols)
            .map(|i| (i as f32 * 0.61 + seed).cos())
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    /// A packed q/k/v layer adapted on q and v only: the pair writes q's and v's
    /// rows of the output and leaves k's at zero.
    #[test]
    fn packed_layers_get_each_modules_rows() {
        let part = |module: &str, rows: usize, offset: usize| TargetPart {
            module: module.into(),
            module_rows: 0..rows,
            offset,
        };
        let spec = TargetSpec {
            in_dim: 3,
            out_dim: 8,
            parts: vec![part("q", 4, 0), part("k", 2, 4), part("v", 2, 6)],
        };
        let (aq, bq) = (tensor(2, 3, 0.1), tensor(4, 2, 0.2));
        let (av, bv) = (tensor(1, 3, 0.3), tensor(2, 1, 0.4));
        let pair = low_rank(
            &spec,
            vec![(0, aq.clone(), bq.clone()), (2, av.clone(), bv.clone())],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let x = tensor(5, 3, 0.5);
        let got = x.matmul(&pair.a_t).unwrap().matmul(&pair.b_t).unwrap();
        let q = x
            .matmul(&aq.t().unwrap())
            .unwrap()
            .matmul(&bq.t().unwrap())
            .unwrap();
        let v = x
            .matmul(&av.t().unwrap())
            .unwrap()
            .matmul(&bv.t().unwrap())
            .unwrap();
        let k = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap();
        let want = Tensor::cat(&[q, k, v], 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got = got.to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn lora_modules_take_both_of_vllms_forms() {
        let want = LoraModuleArg {
            name: "sql".into(),
            path: PathBuf::from("/adapters/sql"),
        };
        assert_eq!(LoraModuleArg::parse("sql=/adapters/sql").unwrap(), want);
        let json = r#"{"name": "sql", "path": "/adapters/sql", "base_model_name": "m"}"#;
        assert_eq!(LoraModuleArg::parse(json).unwrap(), want);
        for bad in ["sql", "=/p", "sql=", r#"{"name": "sql"}"#, "{nope"] {
            let msg = LoraModuleArg::parse(bad).unwrap_err().to_string();
            assert!(msg.contains("--lora-modules"), "{bad}: {msg}");
        }
    }
}
