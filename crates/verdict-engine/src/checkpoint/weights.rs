use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorInfo};
use safetensors::SafeTensors;

use super::ModelFiles;
use crate::error::{EngineError, Result};
use crate::lora::{TargetCollector, TargetId, TargetSpec};

struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl WeightFile {
    /// Drops the pages of a tensor's bytes (offsets relative to the data
    /// section) from our resident set once they have been copied, so loading
    /// does not hold the file and the weights in memory at the same time.
    fn release(&self, start: usize, end: usize) {
        // SAFETY: a read-only file mapping; callers hold no reference into the
        // range after copying it, and later reads fault the pages back in.
        #[cfg(unix)]
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.data_start + start,
                end - start,
            );
        }
    }
}

/// The memory-mapped tensors of a checkpoint. Tensors are copied (and cast)
/// into device storage one at a time as the model asks for them; drop this
/// once the model is built so the mapping goes away.
pub struct Weights {
    files: Vec<WeightFile>,
    /// tensor name -> index into `files`
    names: HashMap<String, usize>,
    dtype: DType,
    device: Device,
    /// Set while a backbone that LoRA adapters may target loads.
    lora_targets: Option<TargetCollector>,
    /// f32 CPU tensors that take the place of stored ones (a LoRA adapter's head
    /// layers with their update merged in).
    replaced: HashMap<String, Tensor>,
}

impl WeightFile {
    /// Maps a safetensors file and reads its header; `rename` maps stored names to
    /// the names the model asks for.
    fn open(path: &std::path::Path, rename: impl Fn(String) -> String) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io_path("opening", path, e))?;
        // SAFETY: the mapping is read-only and checkpoint files are not
        // modified while the engine loads them.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| EngineError::io_path("memory-mapping", path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            EngineError::Weight(format!(
                "{} is not a valid safetensors file (corrupt or truncated): {e}",
                path.display()
            ))
        })?;
        let tensors: HashMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (rename(k), v.clone()))
            .collect();
        Ok(WeightFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

impl Weights {
    /// Maps every safetensors file of the checkpoint and reads its header.
    pub fn open(model: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(model.weights.len());
        let mut names = HashMap::new();
        for (idx, path) in model.weights.iter().enumerate() {
            let file = WeightFile::open(path, |k| k)?;
            for name in file.tensors.keys() {
                names.entry(name.clone()).or_insert(idx);
            }
            files.push(file);
        }
        // A sharded checkpoint's index decides which file owns a name.
        if let Some(index) = &model.weight_index {
            let text = std::fs::read_to_string(index)
                .map_err(|e| EngineError::io_path("reading", index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::Weight(format!("{}: {e}", index.display())))?;
            if let Some(map) = json["weight_map"].as_object() {
                for (name, file) in map {
                    let Some(file) = file.as_str() else { continue };
                    if let Some(idx) = files
                        .iter()
                        .position(|f| f.path.file_name().is_some_and(|n| n == file))
                    {
                        if files[idx].tensors.contains_key(name) {
                            names.insert(name.clone(), idx);
                        }
                    }
                }
            }
        }
        Ok(Weights {
            files,
            names,
            dtype,
            device: device.clone(),
            lora_targets: None,
            replaced: HashMap::new(),
        })
    }

    /// The checkpoint with an adapter file over it: the adapter's tensors, named
    /// without `prefix`, take the place of the checkpoint's. Also returns the
    /// adapter's own tensor names.
    pub fn open_overlay(
        model: &ModelFiles,
        adapter: &std::path::Path,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let mut weights = Self::open(model, dtype, device)?;
        let file = WeightFile::open(adapter, |k| match k.strip_prefix(prefix) {
            Some(rest) => rest.to_string(),
            None => k,
        })?;
        let idx = weights.files.len();
        let mut own: Vec<String> = file.tensors.keys().cloned().collect();
        own.sort_unstable();
        for name in &own {
            weights.names.insert(name.clone(), idx);
        }
        weights.files.push(file);
        Ok((weights, own))
    }

    /// From now on, layers that LoRA adapters may target register themselves.
    pub fn collect_lora_targets(&mut self) {
        self.lora_targets = Some(TargetCollector::default());
    }

    /// Whether layers register as LoRA targets (the engine serves adapters).
    pub fn collects_lora_targets(&self) -> bool {
        self.lora_targets.is_some()
    }

    /// Registers a layer as a LoRA target (only while collecting).
    pub fn register_lora_target(
        &self,
        spec: impl FnOnce() -> Option<TargetSpec>,
    ) -> Option<TargetId> {
        let collector = self.lora_targets.as_ref()?;
        Some(collector.register(spec()?))
    }

    /// The targets registered so far.
    pub fn take_lora_targets(&mut self) -> Vec<TargetSpec> {
        self.lora_targets
            .take()
            .map(TargetCollector::into_specs)
            .unwrap_or_default()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Every tensor name the checkpoint's headers declare.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        let idx = *self.names.get(name)?;
        Some(self.files[idx].tensors[name].shape.as_slice())
    }

    /// A view that resolves names under alternative base prefixes, in order
    /// (e.g. `["bert.", ""]` accepts checkpoints with and without the prefix).
    pub fn root(&self, bases: &[&str]) -> WeightPath<'_> {
        WeightPath {
            weights: self,
            bases: bases
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into(),
            path: String::new(),
        }
    }

    /// The file and header entry of a tensor, its shape checked when given.
    fn entry(&self, name: &str, shape: Option<&[usize]>) -> Result<(&WeightFile, &TensorInfo)> {
        let idx = *self
            .names
            .get(name)
            .ok_or_else(|| EngineError::Weight(format!("missing weight `{name}`")))?;
        let file = &self.files[idx];
        let info = &file.tensors[name];
        if let Some(expected) = shape {
            if info.shape != expected {
                return Err(EngineError::Weight(format!(
                    "weight `{name}` has shape {:?} in {}, but the model config implies {:?}",
                    info.shape,
                    file.path.display(),
                    expected
                )));
            }
        }
        Ok((file, info))
    }

    /// From now on `name` (a stored tensor of the same shape) reads as `tensor`.
    pub fn replace(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        self.entry(name, Some(tensor.dims()))?;
        let tensor = tensor.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        self.replaced.insert(name.to_string(), tensor);
        Ok(())
    }

    /// Loads a tensor by exact name, cast to `dtype`, checking its shape when given.
    pub fn load_exact(&self, name: &str, shape: Option<&[usize]>, dtype: DType) -> Result<Tensor> {
        let (file, info) = self.entry(name, shape)?;
        if let Some(t) = self.replaced.get(name) {
            return Ok(t.to_dtype(dtype)?.to_device(&self.device)?);
        }
        let (start, end) = info.data_offsets;
        let stored = bytes_to_tensor(file, start, end, info.dtype, &info.shape).map_err(|e| {
            EngineError::Weight(format!("weight `{name}` in {}: {e}", file.path.display()))
        })?;
        Ok(stored.to_dtype(dtype)?.to_device(&self.device)?)
    }
}

impl Weights {
    /// A 2-D weight `[rows, cols]` loaded as its f32 transpose `[cols, rows]`
    /// on the CPU, written straight from the mapped bytes in cache-sized tiles
    /// (no intermediate copy, no strided gather afterwards).
    pub fn load_transposed_f32(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        let (file, info) = self.entry(name, Some(&[rows, cols]))?;
        if let Some(t) = self.replaced.get(name) {
            return Ok(t.t()?.contiguous()?);
        }
        if rows == 0 || cols == 0 {
            return Ok(Tensor::zeros((cols, rows), DType::F32, &Device::Cpu)?);
        }
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let read: fn(&[u8], usize) -> f32 = match info.dtype {
            StDtype::F32 => {
                |b, i| f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
            StDtype::BF16 => |b, i| half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            StDtype::F16 => |b, i| half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            _ => {
                let t = self.load_exact(name, Some(&[rows, cols]), DType::F32)?;
                return Ok(t.t()?.contiguous()?);
            }
        };
        let mut out = vec![0f32; rows * cols];
        const TILE: usize = 64;
        // Each chunk is TILE output rows (= TILE input columns).
        out.par_chunks_mut(TILE * rows)
            .enumerate()
            .for_each(|(block, chunk)| {
                let c0 = block * TILE;
                let width = chunk.len() / rows;
                for r0 in (0..rows).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        for dc in 0..width {
                            chunk[dc * rows + r] = read(bytes, r * cols + c0 + dc);
                        }
                    }
                }
            });
        file.release(start, end);
        Ok(Tensor::from_vec(out, (cols, rows), &Device::Cpu)?)
    }
}

/// Converts a tensor's bytes (`start..end` of the data section) into a CPU
/// tensor, releasing the mapped pages a slice at a time as they are copied, so
/// a large tensor never sits in memory twice.
fn bytes_to_tensor(
    file: &WeightFile,
    start: usize,
    end: usize,
    dtype: StDtype,
    shape: &[usize],
) -> Result<Tensor, String> {
    fn collect<T, const N: usize>(
        file: &WeightFile,
        start: usize,
        end: usize,
        f: fn([u8; N]) -> T,
    ) -> Vec<T> {
        const SLICE: usize = 1 << 24;
        let mut out = Vec::with_capacity((end - start) / N);
        let mut at = start;
        while at < end {
            let stop = (at + SLICE).min(end);
            let bytes = &file.mmap[file.data_start + at..file.data_start + stop];
            out.extend(bytes.chunks_exact(N).map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            }));
            file.release(at, stop);
            at = stop;
        }
        out
    }
    let cpu = Device::Cpu;
    let t = match dtype {
        StDtype::F32 => {
            Tensor::from_vec(collect(file, start, end, f32::from_le_bytes), shape, &cpu)
        }
        StDtype::F16 => Tensor::from_vec(
            collect(file, start, end, half::f16::from_le_bytes),
            shape,
            &cpu,
        ),
        StDtype::BF16 => Tensor::from_vec(
            collect(file, start, end, half::bf16::from_le_bytes),
            shape,
            &cpu,
        ),
        StDtype::F64 => {
            Tensor::from_vec(collect(file, start, end, f64::from_le_bytes), shape, &cpu)
        }
        other => return Err(format!("unsupported weight dtype {other:?}")),
    };
    t.map_err(|e| e.to_string())
}

/// A position in the weight namespace, like candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct WeightPath<'a> {
    weights: &'a Weights,
    bases: Arc<[String]>,
    path: String,
}

impl<'a> WeightPath<'a> {
    pub fn pp(&self, segment: impl std::fmt::Display) -> WeightPath<'a> {
        let path = if self.path.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.path)
        };
        WeightPath {
            weights: self.weights,
            bases: self.bases.clone(),
            path,
        }
    }

    pub fn weights(&self) -> &'a Weights {
        self.weights
    }

    fn full(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn resolve(&self, name: &str) -> Result<String> {
        let rel = self.full(name);
        for base in self.bases.iter() {
            let candidate = format!("{base}{rel}");
            if self.weights.contains(&candidate) {
                return Ok(candidate);
            }
        }
        let tried: Vec<String> = self.bases.iter().map(|b| format!("`{b}{rel}`")).collect();
        Err(EngineError::Weight(format!(
            "missing weight `{rel}` (looked for {})",
            tried.join(", ")
        )))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }

    /// The tensor in the model dtype, with its shape checked.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.resolve(name)?;
        self.weights
            .load_exact(&full, Some(shape), self.weights.dtype)
    }

    /// The tensor in a given dtype (heads run in fp32), with its shape checked.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let full = self.resolve(name)?;
        self.weights.load_exact(&full, Some(shape), dtype)
    }

    /// A `[rows, cols]` weight as its f32 transpose, built directly from the file.
    pub fn get_transposed_f32(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let full = self.resolve(name)?;
        self.weights.load_transposed_f32(&full, rows, cols)
    }

    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.resolve(name).ok()?;
        self.weights.shape_of(&full).map(<[usize]>::to_vec)
    }

    /// The checkpoint name of the module here (its `weight` without the suffix),
    /// as PEFT names the module.
    pub fn module_name(&self) -> Option<String> {
        let full = self.resolve("weight").ok()?;
        full.strip_suffix(".weight").map(str::to_owned)
    }

    /// Registers a layer computing rows `rows` of the module here as a LoRA target.
    pub fn lora_target_rows(
        &self,
        in_dim: usize,
        rows: std::ops::Range<usize>,
    ) -> Option<TargetId> {
        self.weights
            .register_lora_target(|| Some(TargetSpec::slice(self.module_name()?, in_dim, rows)))
    }

    /// Registers the layer here as a LoRA target computing all of this module.
    pub fn lora_target(&self, in_dim: usize, out_dim: usize) -> Option<TargetId> {
        self.weights
            .register_lora_target(|| Some(TargetSpec::whole(self.module_name()?, in_dim, out_dim)))
    }
}
