//! Scheduling priority of the threads that compute (model forward passes, the
//! batcher, tokenization). A server lowers it so that on a saturated machine the
//! threads that answer `/health`, accept connections and parse requests are
//! scheduled first: niceness only orders the process's own threads, it does not
//! give the host's other work more CPU than it had.

use std::sync::atomic::{AtomicI32, Ordering};

static COMPUTE_NICENESS: AtomicI32 = AtomicI32::new(0);

/// Sets how much lower than the rest of the process compute threads run (0 to 19;
/// 0 leaves them alone), and builds rayon's global pool (the matrix products' workers)
/// so that its threads take that priority too. Call it before the first engine is made:
/// rayon's pool cannot be rebuilt once something has used it, and then only threads
/// started later are lowered.
pub fn set_compute_niceness(niceness: i32) {
    let niceness = niceness.clamp(0, 19);
    COMPUTE_NICENESS.store(niceness, Ordering::Relaxed);
    if niceness > 0 {
        // Fails only when the pool already exists; then its threads keep their priority.
        let built = rayon::ThreadPoolBuilder::new()
            .start_handler(|_| lower_current_thread())
            .build_global();
        if built.is_err() {
            tracing::warn!("the compute thread pool already ran; its threads keep their priority");
        }
    }
}

/// Lowers the calling thread by the configured niceness.
pub fn lower_current_thread() {
    let niceness = COMPUTE_NICENESS.load(Ordering::Relaxed);
    if niceness > 0 {
        renice_current_thread(niceness);
    }
}

/// Linux keeps niceness per thread: `setpriority(PRIO_PROCESS, 0)` sets the caller's.
#[cfg(target_os = "linux")]
fn renice_current_thread(by: i32) {
    // SAFETY: getpriority/setpriority with PRIO_PROCESS and who = 0 read and set the
    // calling thread's niceness; they touch no memory of ours.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        // Raising niceness never needs privileges; failure leaves the thread as it was.
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, (current + by).min(19));
    }
}

#[cfg(not(target_os = "linux"))]
fn renice_current_thread(_by: i32) {}
