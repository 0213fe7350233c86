//! Image bytes through the decode path with a small pixel budget: the header's
//! size is charged before decoding, so no input may make it decode more than
//! the budget, panic or run long.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use verdict_engine::multimodal::{MediaPolicy, VisionProcessor};

fn processor() -> &'static VisionProcessor {
    static PROCESSOR: OnceLock<VisionProcessor> = OnceLock::new();
    PROCESSOR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen2_5_vl-cls");
        VisionProcessor::load(&dir).expect("fixture processor")
    })
}

fuzz_target!(|data: &[u8]| {
    let policy = MediaPolicy {
        max_image_pixels: 1 << 20,
        max_request_pixels: 2 << 20,
        ..MediaPolicy::default()
    };
    let mut budget = policy.pixel_budget();
    // Twice: the second image is charged against what the first left.
    for _ in 0..2 {
        let _ = processor().image_within(data, &mut budget);
    }
});
