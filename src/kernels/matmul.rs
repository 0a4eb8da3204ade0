//! The `gemm` crate's f32 matrix product, as the kernels call it.

use gemm::{gemm, Parallelism};

/// A matrix operand: its first element, then the distance between neighbours along a row
/// (between columns) and along a column (between rows), in elements.
pub(super) type Operand<P> = (P, usize, usize);

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, for an `m × k` `lhs` and a
/// `k × n` `rhs`.
///
/// # Safety
/// Each operand must hold every element its shape and strides reach, and no other thread
/// may write `dst` meanwhile.
pub(super) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, accumulate): (Operand<*mut f32>, bool),
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    parallelism: Parallelism,
) {
    let s = |v: usize| v as isize;
    #[rustfmt::skip]
    gemm(
        m, n, k,
        dst.0, s(dst.1), s(dst.2), accumulate,
        lhs.0, s(lhs.1), s(lhs.2),
        rhs.0, s(rhs.1), s(rhs.2),
        // With `accumulate` false, gemm ignores the first factor.
        1.0, 1.0, false, false, false, parallelism,
    );
}
