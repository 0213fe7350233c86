//! The `verdict` command: serve a classifier over HTTP, classify or score
//! files offline, and benchmark.

// Tensor ops allocate and free large buffers constantly; glibc returns them to
// the kernel each time (page faults and zeroing on every op), mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(verdict::run(std::env::args_os()));
}
