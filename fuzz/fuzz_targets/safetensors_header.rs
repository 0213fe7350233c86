//! The checkpoint loader on an arbitrary `model.safetensors`: the header is
//! parsed, then every tensor it declares is loaded the ways models load them.
//! Anything may be refused with an error; nothing may panic.
#![no_main]

use std::path::PathBuf;

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use verdict_engine::checkpoint::{ModelFiles, Weights};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, data).expect("writing the checkpoint");
    let files = ModelFiles {
        dir: dir.path().to_path_buf(),
        config: PathBuf::from("config.json"),
        weights: vec![path],
        weight_index: None,
    };
    let Ok(weights) = Weights::open(&files, DType::F32, &Device::Cpu) else {
        return;
    };
    let root = weights.root(&[""]);
    for name in weights.names() {
        let Some(shape) = root.shape_of(name) else {
            continue;
        };
        // Large declared tensors are fine to refuse; skip loading them to keep runs fast.
        if shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none_or(|n| n > 1 << 20)
        {
            continue;
        }
        let _ = root.get(name, &shape);
        if let [rows, cols] = shape[..] {
            let _ = root.get_transposed_f32(name, rows, cols);
        }
    }
});
