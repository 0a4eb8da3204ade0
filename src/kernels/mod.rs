//! Fast CPU kernels for f32 convolutions and batch norm; the layers in [`crate::layers`] run
//! on them and fall back to Candle's ops on other devices and dtypes.
//!
//! Candle's CPU `conv2d` re-lays the kernel out on every call and materialises im2col tile by
//! tile; on the 2-core machines we target it reaches 25–60 % of its own matrix-product speed.
//! Here a convolution becomes matrix products on the `gemm` crate (which Candle's matmul
//! uses) with no per-call weight work:
//!
//! - stride 1: one product per kernel tap over a shifted view of the zero-padded input,
//!   accumulated into an output laid out on the padded width (a 1×1 conv is one product
//!   straight from the input);
//! - stride > 1: im2col over a band of output rows at a time, then one product per band;
//! - 3×3 stride 1 with at least 64 input channels (the heads, FPN outputs, every stage):
//!   Winograd F(4×4, 3×3), 4× fewer multiplications, about 1e-6 relative error per layer.
//!
//! The bias (folded batch norm), an optional residual and the ReLU are fused: the output is
//! initialised with bias + residual, the products accumulate into it, and the ReLU is applied
//! while the result is compacted. The backward passes of training live in `backward`.

mod backward;
mod batch_norm;
pub mod bf16;
mod direct;
mod epilogue;
mod host;
mod im2col;
mod matmul;
pub mod profile;
mod select;
mod winograd;

pub(crate) use backward::{
    channel_sums, grad_input_strided, grad_weight, scale_rows, scale_rows_in_place,
};
pub(crate) use batch_norm::BatchNormOp;
pub use direct::{Algorithm, FusedConv2d, Precision};
pub(crate) use host::{f32_slice, host, host_f32, slice, with_host};
pub(crate) use im2col::Geometry;
pub(crate) use select::native;
pub use select::{current, scoped, Kernels};

/// `max |t|` of an f32 tensor, for tests.
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_scalar::<f32>())
        .expect("an f32 tensor")
}

/// For unit tests that cannot run their checks on this CPU: says why where `cargo test` shows
/// it, and in `target/skipped-tests.txt`, which `scripts/test.sh` prints after the run (the
/// harness hides a passing test's output).
#[cfg(test)]
pub(crate) fn skip_test(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("skipped {test}: {reason}");
    eprintln!("{line}");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/target/skipped-tests.txt");
    let mut out = std::fs::OpenOptions::new();
    let appended = out.create(true).append(true).open(file);
    if let Err(e) = appended.and_then(|mut f| writeln!(f, "{line}")) {
        eprintln!("cannot record the skip in {file}: {e}");
    }
}
