//! Helpers shared by the unit tests.

use candle_core::Tensor;

/// The largest `|a - b|` over two tensors of one shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape and dtype f32")
}
