//! With the `cuda` feature, compiles our CUDA kernels (kernels/*.cu) to PTX with
//! nvcc; the CPU build does nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/attention.cu");
    println!("cargo:rerun-if-changed=kernels/fused.cu");
    println!("cargo:rerun-if-changed=kernels/convert.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // The lowest architecture with bf16 tensor cores unless told otherwise; the
    // driver JIT-compiles the PTX for the card it runs on.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["attention", "fused"] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(format!("kernels/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (put the CUDA toolkit's bin on PATH): {e}"));
        assert!(status.success(), "{nvcc} failed on kernels/{name}.cu");
    }
}
