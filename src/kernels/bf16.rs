//! Products in bfloat16 with f32 accumulation, on AVX512-BF16's `vdpbf16ps`: one instruction
//! does 32 multiply-adds where an f32 FMA does 16, at the cost of rounding weights and
//! activations to 8 significant bits (relative error 2⁻⁹ per operand). Opt-in through
//! [`super::Precision::Bf16`]; other CPUs keep the f32 products.

use super::winograd::Winograd;

/// Whether this CPU runs the bf16 products.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rounds to the nearest bf16 (ties to even), as the bits of a `u16` in a `u32`.
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16
}

/// A constant `m × k` left operand as bf16 pairs along `k`:
/// `data[i·kp + p] = A[i][2p] | A[i][2p + 1] << 16`, `kp = ⌈k / 2⌉`.
#[derive(Debug, Clone)]
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    kp: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Packs a row-major `m × k` matrix.
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        let kp = k.div_ceil(2);
        let mut data = vec![0u32; m * kp];
        for (row, dst) in a.chunks_exact(k).zip(data.chunks_exact_mut(kp)) {
            for (p, d) in dst.iter_mut().enumerate() {
                let lo = bf16_bits(row[2 * p]);
                let hi = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
                *d = lo | hi << 16;
            }
        }
        Self { m, k, kp, data }
    }
}

/// `dst (m × n, rows n apart) (+)= A · B` with `B` the `k × n` f32 matrix whose rows start
/// `rs` floats apart at `b`.
///
/// # Safety
/// [`supported`] must hold; `b` must hold `k` rows of `rs` with `n` readable values each;
/// `dst` must be `m × n`.
pub(crate) unsafe fn gemm(a: &PackedA, b: &[f32], rs: usize, n: usize, dst: &mut [f32], acc: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let np = n.div_ceil(32) * 32;
        let mut bp = vec![0u32; a.kp * np];
        x86::pack_b(b, rs, a.k, n, np, &mut bp);
        if !acc {
            dst[..a.m * n].fill(0.0);
        }
        x86::kernel(a, &bp, np, n, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, rs, n, dst, acc);
        unreachable!("bf16 products need x86-64 with AVX512-BF16");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PackedA;
    use std::arch::x86_64::*;

    /// `bp[p·np + j] = B[2p][j] | B[2p + 1][j] << 16` in bf16, zero past `n` (and past `k`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_b(b: &[f32], rs: usize, k: usize, n: usize, np: usize, bp: &mut [u32]) {
        let kp = k.div_ceil(2);
        for p in 0..kp {
            let r0 = b.as_ptr().add(2 * p * rs);
            let r1 = (2 * p + 1 < k).then(|| b.as_ptr().add((2 * p + 1) * rs));
            let out = bp.as_mut_ptr().add(p * np);
            let mut j = 0;
            while j < n {
                let len = (n - j).min(16);
                let mask: __mmask16 = if len == 16 { 0xffff } else { (1u16 << len) - 1 };
                let x0 = _mm512_maskz_loadu_ps(mask, r0.add(j));
                let x1 = match r1 {
                    Some(r) => _mm512_maskz_loadu_ps(mask, r.add(j)),
                    None => _mm512_setzero_ps(),
                };
                let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(x0),
                ));
                let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(x1),
                ));
                let pair = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(out.add(j) as *mut __m512i, pair);
                j += 16;
            }
        }
    }

    /// Rows of `A` per register block (two 16-column accumulators each: 12 of 32 registers).
    const MR: usize = 6;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel(a: &PackedA, bp: &[u32], np: usize, n: usize, dst: &mut [f32]) {
        // Column blocks outside: a block of B (kp × 32) stays in L2 while every row block of
        // A streams past it.
        for j0 in (0..np).step_by(32) {
            let mut i0 = 0;
            while i0 < a.m {
                match a.m - i0 {
                    1 => block::<1>(a, bp, np, n, dst, i0, j0),
                    2 => block::<2>(a, bp, np, n, dst, i0, j0),
                    3 => block::<3>(a, bp, np, n, dst, i0, j0),
                    4 => block::<4>(a, bp, np, n, dst, i0, j0),
                    5 => block::<5>(a, bp, np, n, dst, i0, j0),
                    _ => block::<MR>(a, bp, np, n, dst, i0, j0),
                }
                i0 += MR;
            }
        }
    }

    /// Rows `i0..i0 + R` × columns `j0..j0 + 32` of the product, added to `dst`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        a: &PackedA,
        bp: &[u32],
        np: usize,
        n: usize,
        dst: &mut [f32],
        i0: usize,
        j0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let rows: [*const u32; R] = std::array::from_fn(|r| a.data.as_ptr().add((i0 + r) * a.kp));
        let mut col = bp.as_ptr().add(j0);
        for p in 0..a.kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(col as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(col.add(16) as *const __m512i));
            for r in 0..R {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[r].add(p) as i32));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
            }
            col = col.add(np);
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let c = j0 + 16 * h;
                if c >= n {
                    break;
                }
                let len = (n - c).min(16);
                let mask: __mmask16 = if len == 16 { 0xffff } else { (1u16 << len) - 1 };
                let d = dst.as_mut_ptr().add((i0 + r) * n + c);
                let old = _mm512_maskz_loadu_ps(mask, d);
                _mm512_mask_storeu_ps(d, mask, _mm512_add_ps(old, v));
            }
        }
    }
}

/// Which constant operand a product multiplies by.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lhs {
    /// Kernel tap `t` (stride-1 convolutions), `cout × cin`.
    Tap(usize),
    /// The whole kernel in im2col order (strided convolutions), `cout × cin·k·k`.
    Im2col,
    /// Winograd position `ξ`, `cout × cin`.
    Winograd(usize),
}

/// The bf16 forms of a convolution's constant operands.
#[derive(Debug, Clone)]
pub(super) struct Bf16Weights {
    taps: Vec<PackedA>,
    im2col: Option<PackedA>,
    winograd: Vec<PackedA>,
}

impl Bf16Weights {
    /// From the f32 packing (`[tap][cout][cin]` for stride 1, `[cout][cin·k·k]` otherwise)
    /// and the Winograd weights.
    pub(super) fn new(
        packed: &[f32],
        wg: Option<&Winograd>,
        (cout, cin, k, stride): (usize, usize, usize, usize),
    ) -> Self {
        let per = |v: &[f32]| {
            v.chunks_exact(cout * cin)
                .map(|m| PackedA::new(m, cout, cin))
                .collect()
        };
        Self {
            taps: if stride == 1 { per(packed) } else { Vec::new() },
            im2col: (stride != 1).then(|| PackedA::new(packed, cout, cin * k * k)),
            winograd: wg.map_or_else(Vec::new, |w| per(&w.u)),
        }
    }

    pub(super) fn get(&self, which: Lhs) -> &PackedA {
        match which {
            Lhs::Tap(t) => &self.taps[t],
            Lhs::Im2col => self
                .im2col
                .as_ref()
                .expect("strided convolutions pack im2col"),
            Lhs::Winograd(xi) => &self.winograd[xi],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_product_matches_f32_within_bf16_rounding() {
        if !supported() {
            crate::kernels::skip_test(
                "kernels::bf16::tests::bf16_product_matches_f32_within_bf16_rounding",
                "this CPU has no AVX512-BF16, so the bf16 products were not compared with f32",
            );
            return;
        }
        for (m, k, n) in [(7, 5, 3), (13, 64, 40), (64, 131, 77), (6, 2, 32)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 31.0)
                .collect();
            let rs = n + 3;
            let b: Vec<f32> = (0..k * rs)
                .map(|i| ((i * 104729 % 89) as f32 - 44.0) / 17.0)
                .collect();
            let packed = PackedA::new(&a, m, k);
            let mut dst = vec![1f32; m * n];
            // SAFETY: checked support; shapes as documented.
            unsafe { gemm(&packed, &b, rs, n, &mut dst, true) };
            let round = |x: f32| f32::from_bits(bf16_bits(x) << 16);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|c| round(a[i * k + c]) as f64 * round(b[c * rs + j]) as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|c| (a[i * k + c] as f64 * b[c * rs + j] as f64).abs())
                        .sum();
                    let got = dst[i * n + j] as f64 - 1.0;
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale.max(1.0),
                        "{m}x{k}x{n} [{i}][{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
