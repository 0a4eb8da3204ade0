//! Products in bfloat16 with f32 accumulation, on AVX512-BF16's `vdpbf16ps`: one instruction
//! does 32 multiply-adds where an f32 FMA does 16, at the cost of rounding weights and
//! activations to 8 significant bits (relative error 2⁻⁹ per operand). Opt-in through
//! [`super::Precision::Bf16`]; other CPUs keep the f32 products.

use rayon::prelude::*;

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

/// Whether the bf16 products run on AMX tiles (see [`gemm`]).
pub fn tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        supported() && amx::available()
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
/// `data[i·stride + p] = A[i][2p] | A[i][2p + 1] << 16` for `p < kp = ⌈k / 2⌉`, zero up to
/// `stride` (a multiple of 16) and in the rows from `m` up to a multiple of 32: whole AMX
/// tiles (16 rows × 16 pairs) then read nothing but the matrix and zeros.
#[derive(Debug, Clone)]
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    kp: usize,
    stride: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Packs a row-major `m × k` matrix.
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        let kp = k.div_ceil(2);
        let stride = kp.div_ceil(16) * 16;
        let mut data = vec![0u32; m.div_ceil(32) * 32 * stride];
        for (row, dst) in a.chunks_exact(k).zip(data.chunks_exact_mut(stride)) {
            for (p, d) in dst[..kp].iter_mut().enumerate() {
                let lo = bf16_bits(row[2 * p]);
                let hi = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
                *d = lo | hi << 16;
            }
        }
        Self {
            m,
            k,
            kp,
            stride,
            data,
        }
    }
}

/// `dst (m × n, rows n apart) (+)= A · B` with `B` the `k × n` f32 matrix whose rows start
/// `rs` floats apart at `b`: on AMX tiles where the CPU and kernel have them (Intel Xeon
/// since Sapphire Rapids: 16 × 16 × 32 products per instruction), else on AVX512-BF16.
///
/// # Safety
/// [`supported`] must hold; `b` must hold `k` rows of `rs` with `n` readable values each;
/// `dst` must be `m × n`.
pub(crate) unsafe fn gemm(a: &PackedA, b: &[f32], rs: usize, n: usize, dst: &mut [f32], acc: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let tiles = amx::available();
        // B in whole panels: 32 columns (two tiles) with AMX, else 16 (one vector).
        let np = if tiles {
            n.div_ceil(32) * 32
        } else {
            n.div_ceil(16) * 16
        };
        PACKED_B.with_borrow_mut(|bp| {
            if bp.len() < a.stride * np {
                bp.resize(a.stride * np, 0);
            }
            x86::pack_b(b, rs, a.k, n, np, bp);
            // Pair rows past k up to the tiles' depth: zero (stale values times A's zero
            // columns could still be NaN times 0).
            bp[a.kp * np..a.stride * np].fill(0);
            if !acc {
                dst[..a.m * n].fill(0.0);
            }
            kernel(a, bp.as_ptr(), np, n, dst);
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, rs, n, dst, acc);
        unreachable!("bf16 products need x86-64 with AVX512-BF16");
    }
}

/// `dst += A · B` for `B` already packed: `a.stride` pair rows `rs` apart from `b`, with
/// whole panels readable (32 columns with AMX, 16 without) past `n`.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel(a: &PackedA, b: *const u32, rs: usize, n: usize, dst: &mut [f32]) {
    if amx::available() {
        amx::kernel(a, b, rs, n, dst);
    } else {
        x86::kernel(a, b, rs, n, dst);
    }
}

/// A `k × n` right operand (`k` planes of `n` values, such as a padded input's channels)
/// packed once as bf16 pairs along `k`, for several products over shifted views of it (the
/// taps of a stride-1 convolution).
#[derive(Debug)]
pub(crate) struct PackedB {
    data: Vec<u32>,
    /// Pair rows, zero past ⌈k / 2⌉ up to a multiple of 16.
    rows: usize,
    /// Values per pair row: `n` plus room for the panels of the last view.
    rs: usize,
}

impl PackedB {
    /// Packs `k` planes of `n` floats, `n` apart in `b`; views may start up to `n` and read
    /// 32 values past their end.
    pub fn new(b: &[f32], k: usize, n: usize) -> Self {
        let rows = k.div_ceil(2).div_ceil(16) * 16;
        let rs = n + 64;
        let mut data = vec![0u32; rows * rs];
        data.par_chunks_mut(rs)
            .take(k.div_ceil(2))
            .enumerate()
            .for_each(|(p, row)| {
                let hi = (2 * p + 1 < k).then(|| &b[(2 * p + 1) * n..][..n]);
                pack_pair_row(&b[2 * p * n..][..n], hi, &mut row[..n]);
            });
        Self { data, rows, rs }
    }

    /// `dst (m × nb) (+)= A · B[:, q0 .. q0 + nb]`.
    ///
    /// # Safety
    /// [`supported`] must hold; `q0 + nb` at most the packed `n`; `dst` `a.m × nb`; `A` of
    /// `k` columns as packed.
    pub unsafe fn gemm(&self, a: &PackedA, q0: usize, nb: usize, dst: &mut [f32], acc: bool) {
        debug_assert!(a.stride == self.rows && q0 + nb + 32 <= self.rs);
        if !acc {
            dst[..a.m * nb].fill(0.0);
        }
        #[cfg(target_arch = "x86_64")]
        kernel(a, self.data.as_ptr().add(q0), self.rs, nb, dst);
    }
}

impl PackedB {
    /// `dst (m × nb) (+)= Σ_t A_t · B[:, q0 + o_t .. q0 + o_t + nb]` over `(A_t, o_t)` in
    /// `parts`: a convolution's taps, summed in AMX tiles where there are some.
    ///
    /// # Safety
    /// As [`PackedB::gemm`] for every part.
    pub unsafe fn gemm_sum(
        &self,
        parts: &[(&PackedA, usize)],
        q0: usize,
        nb: usize,
        dst: &mut [f32],
        acc: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            if let Some((a, _)) = parts.first() {
                if !acc {
                    dst[..a.m * nb].fill(0.0);
                }
            }
            let base = self.data.as_ptr().add(q0);
            let views: Vec<_> = parts.iter().map(|&(a, o)| (a, base.add(o))).collect();
            amx::sum_kernel(&views, self.rs, nb, dst);
            return;
        }
        for (t, &(a, o)) in parts.iter().enumerate() {
            self.gemm(a, q0 + o, nb, dst, acc || t > 0);
        }
    }
}

/// One pair row: `out[j] = bf16(lo[j]) | bf16(hi[j]) << 16` (`hi` zero when absent).
fn pack_pair_row(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: bf16 packing is only reached where `supported` holds; lengths match.
    unsafe {
        x86::pack_row(lo, hi, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (j, o) in out.iter_mut().enumerate() {
        *o = bf16_bits(lo[j]) | hi.map_or(0, |h| bf16_bits(h[j])) << 16;
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's packed right operand, reused from product to product.
    static PACKED_B: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PackedA;
    use std::arch::x86_64::*;

    /// `bp[p·np + j] = B[2p][j] | B[2p + 1][j] << 16` in bf16, zero past `n` (and past `k`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_b(b: &[f32], rs: usize, k: usize, n: usize, np: usize, bp: &mut [u32]) {
        for p in 0..k.div_ceil(2) {
            let lo = std::slice::from_raw_parts(b.as_ptr().add(2 * p * rs), n);
            let hi = (2 * p + 1 < k)
                .then(|| std::slice::from_raw_parts(b.as_ptr().add((2 * p + 1) * rs), n));
            let row = &mut bp[p * np..][..np];
            pack_row(lo, hi, &mut row[..n]);
            row[n..].fill(0);
        }
    }

    /// `out[j] = bf16(lo[j]) | bf16(hi[j]) << 16`, 16 at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_row(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
        let n = out.len();
        let mut j = 0;
        while j < n {
            let len = (n - j).min(16);
            let mask: __mmask16 = if len == 16 { 0xffff } else { (1u16 << len) - 1 };
            let x0 = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(j));
            let x1 = match hi {
                Some(h) => _mm512_maskz_loadu_ps(mask, h.as_ptr().add(j)),
                None => _mm512_setzero_ps(),
            };
            let lo16 = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(x0),
            ));
            let hi16 = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(x1),
            ));
            let pair = _mm512_or_si512(lo16, _mm512_slli_epi32::<16>(hi16));
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j) as *mut i32, mask, pair);
            j += 16;
        }
    }

    /// Rows of `A` per register block.
    const MR: usize = 6;
    /// 16-column vectors of `B` per register block: 6 × 4 accumulators, 4 of `B` and a
    /// broadcast take 29 of the 32 registers, and each loaded value feeds 4 or 6 of the
    /// 24 independent dot products per step (enough to cover their latency on two pipes).
    const NV: usize = 4;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel(a: &PackedA, bp: *const u32, np: usize, n: usize, dst: &mut [f32]) {
        let ncols = n.div_ceil(16) * 16;
        // Column panels outside: a panel of B (kp × 64) stays in L1/L2 while every row block
        // of A streams past it.
        for j0 in (0..ncols).step_by(16 * NV) {
            match ((ncols - j0) / 16).min(NV) {
                1 => rows::<1>(a, bp, np, n, dst, j0),
                2 => rows::<2>(a, bp, np, n, dst, j0),
                3 => rows::<3>(a, bp, np, n, dst, j0),
                _ => rows::<NV>(a, bp, np, n, dst, j0),
            }
        }
    }

    /// Every row block of the panel of `C` 16-column vectors at `j0`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows<const C: usize>(
        a: &PackedA,
        bp: *const u32,
        np: usize,
        n: usize,
        dst: &mut [f32],
        j0: usize,
    ) {
        let mut i0 = 0;
        while i0 < a.m {
            match a.m - i0 {
                1 => block::<1, C>(a, bp, np, n, dst, i0, j0),
                2 => block::<2, C>(a, bp, np, n, dst, i0, j0),
                3 => block::<3, C>(a, bp, np, n, dst, i0, j0),
                4 => block::<4, C>(a, bp, np, n, dst, i0, j0),
                5 => block::<5, C>(a, bp, np, n, dst, i0, j0),
                _ => block::<MR, C>(a, bp, np, n, dst, i0, j0),
            }
            i0 += MR;
        }
    }

    /// Rows `i0..i0 + R` × columns `j0..j0 + 16·C` of the product, added to `dst`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize, const C: usize>(
        a: &PackedA,
        bp: *const u32,
        np: usize,
        n: usize,
        dst: &mut [f32],
        i0: usize,
        j0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let rows: [*const u32; R] =
            std::array::from_fn(|r| a.data.as_ptr().add((i0 + r) * a.stride));
        let mut col = bp.add(j0);
        for p in 0..a.kp {
            let b: [__m512bh; C] = std::array::from_fn(|c| {
                std::mem::transmute(_mm512_loadu_si512(col.add(16 * c) as *const __m512i))
            });
            for r in 0..R {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[r].add(p) as i32));
                for c in 0..C {
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, b[c]);
                }
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

/// Intel's Advanced Matrix Extensions: eight tile registers of 16 rows × 64 bytes and
/// `tdpbf16ps`, a 16 × 16 block of f32 sums of 32 bf16 products each, per instruction. Rust
/// has no stable intrinsics for them, so the few instructions are inline assembly.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::PackedA;
    use std::arch::asm;
    use std::sync::OnceLock;

    /// Whether AMX-BF16 runs here: the CPU has it (CPUID.7.0:EDX bits 22 and 24), and Linux
    /// lets this process use the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once).
    /// `RETINANET_NO_AMX=1` turns it off (the AVX512-BF16 products then run).
    pub fn available() -> bool {
        #[cfg(test)]
        if OFF_IN_TEST.get() {
            return false;
        }
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if std::env::var_os("RETINANET_NO_AMX").is_some_and(|v| v != "0") {
                return false;
            }
            // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX-512.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let cpu = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
            cpu && request_tile_data()
        })
    }

    #[cfg(test)]
    thread_local! {
        /// Set by tests to run the AVX512-BF16 products on this thread where AMX exists.
        pub static OFF_IN_TEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[cfg(target_os = "linux")]
    fn request_tile_data() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: asks the kernel for a permission; no memory is passed.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_data() -> bool {
        false
    }

    /// The tile configuration `ldtilecfg` reads (palette 1): all eight tiles 16 rows × 64
    /// bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// A 32 × 32 block of f32, as the four accumulator tiles are stored.
    #[repr(C, align(64))]
    struct Block([f32; 32 * 32]);

    /// `dst += A · B` over whole 32 × 32 blocks: tiles 0–3 accumulate a block, 4–5 hold two
    /// 16-row slices of A, 6–7 two 16-column slices of B, so each tile loaded feeds two
    /// products. `bp` holds `a.stride` pair rows `np` apart, each readable to `n` rounded up
    /// to 32.
    ///
    /// # Safety
    /// [`available`] must hold; `dst` must be `a.m × n` and `bp` as described.
    pub unsafe fn kernel(a: &PackedA, bp: *const u32, np: usize, n: usize, dst: &mut [f32]) {
        sum_kernel(&[(a, bp)], np, n, dst);
    }

    /// `dst += Σ A_t · B_t` over the `(A_t, B_t)` of `parts` (the taps of a convolution, each
    /// A its weights and each B a shifted view of one packed input), summed in the tiles:
    /// `dst` is read and written once.
    ///
    /// # Safety
    /// As [`kernel`] for every part; all A of the same shape.
    pub unsafe fn sum_kernel(
        parts: &[(&PackedA, *const u32)],
        np: usize,
        n: usize,
        dst: &mut [f32],
    ) {
        let Some(&(first, _)) = parts.first() else {
            return;
        };
        let (m, stride) = (first.m, first.stride);
        debug_assert!(parts.iter().all(|(a, _)| a.m == m && a.stride == stride));
        let ncols = n.div_ceil(32) * 32;
        // Only the eight tiles that exist may be configured (others must be 0, or #GP).
        let config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: std::array::from_fn(|t| if t < 8 { 64 } else { 0 }),
            rows: std::array::from_fn(|t| if t < 8 { 16 } else { 0 }),
        };
        asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
        let (sa, sb) = (stride * 4, np * 4);
        let mut block = Block([0.0; 32 * 32]);
        let out = block.0.as_mut_ptr();
        for j0 in (0..ncols).step_by(32) {
            for i0 in (0..m).step_by(32) {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for &(a, bp) in parts {
                    let a0 = a.data.as_ptr().add(i0 * stride);
                    let b0 = bp.add(j0);
                    for p0 in (0..stride).step_by(16) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}]",
                            "tileloadd tmm5, [{a1} + {sa}]",
                            "tileloadd tmm6, [{b0} + {sb}]",
                            "tileloadd tmm7, [{b1} + {sb}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0.add(p0),
                            a1 = in(reg) a0.add(16 * stride + p0),
                            b0 = in(reg) b0.add(p0 * np),
                            b1 = in(reg) b0.add(p0 * np + 16),
                            sa = in(reg) sa,
                            sb = in(reg) sb,
                            options(nostack, readonly)
                        );
                    }
                }
                asm!(
                    "tilestored [{o0} + {s}], tmm0",
                    "tilestored [{o1} + {s}], tmm1",
                    "tilestored [{o2} + {s}], tmm2",
                    "tilestored [{o3} + {s}], tmm3",
                    o0 = in(reg) out,
                    o1 = in(reg) out.add(16),
                    o2 = in(reg) out.add(16 * 32),
                    o3 = in(reg) out.add(16 * 32 + 16),
                    s = in(reg) 32usize * 4,
                    options(nostack)
                );
                let cols = (n.saturating_sub(j0)).min(32);
                for i in i0..(i0 + 32).min(m) {
                    let src = &block.0[(i - i0) * 32..][..cols];
                    let d = &mut dst[i * n + j0..][..cols];
                    d.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
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

    /// Runs `check` with AMX tiles (where the CPU has them), then with the AVX512-BF16
    /// kernel; `check` gets whether AMX was turned off.
    fn on_both_kernels(test: &str, check: impl Fn(bool)) {
        if !supported() {
            crate::kernels::skip_test(
                test,
                "this CPU has no AVX512-BF16, so the bf16 products were not compared with f32",
            );
            return;
        }
        for no_amx in [false, true] {
            #[cfg(target_arch = "x86_64")]
            amx::OFF_IN_TEST.set(no_amx);
            check(no_amx);
        }
        #[cfg(target_arch = "x86_64")]
        amx::OFF_IN_TEST.set(false);
    }

    fn round(x: f32) -> f64 {
        f32::from_bits(bf16_bits(x) << 16) as f64
    }

    fn values(len: usize, p: usize, q: usize, d: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * p % q) as f32 - q as f32 / 2.0) / d)
            .collect()
    }

    #[test]
    fn bf16_product_matches_f32_within_bf16_rounding() {
        let test = "kernels::bf16::tests::bf16_product_matches_f32_within_bf16_rounding";
        on_both_kernels(test, |no_amx| {
            for (m, k, n) in [
                (7, 5, 3),
                (13, 64, 40),
                (64, 131, 77),
                (6, 2, 32),
                (9, 70, 200),
            ] {
                let a = values(m * k, 7919, 97, 31.0);
                let rs = n + 3;
                let b = values(k * rs, 104729, 89, 17.0);
                let packed = PackedA::new(&a, m, k);
                let mut dst = vec![1f32; m * n];
                // SAFETY: checked support; shapes as documented.
                unsafe { gemm(&packed, &b, rs, n, &mut dst, true) };
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|c| (a[i * k + c], b[c * rs + j]));
                        let exact: f64 = terms.clone().map(|(x, y)| round(x) * round(y)).sum();
                        let scale: f64 = terms.map(|(x, y)| (x as f64 * y as f64).abs()).sum();
                        let got = dst[i * n + j] as f64 - 1.0;
                        assert!(
                            (got - exact).abs() <= 1e-5 * scale.max(1.0),
                            "{m}x{k}x{n} [{i}][{j}] (AMX off: {no_amx}): {got} vs {exact}"
                        );
                    }
                }
            }
        });
    }

    /// The taps' sum over shifted views of one packed operand, as a convolution runs it.
    #[test]
    fn packed_views_sum_like_separate_products() {
        let test = "kernels::bf16::tests::packed_views_sum_like_separate_products";
        on_both_kernels(test, |no_amx| {
            let (m, k, n) = (40, 70, 300);
            let b = values(k * n, 104729, 89, 17.0);
            let packed = PackedB::new(&b, k, n);
            let weights: Vec<Vec<f32>> =
                (0..3).map(|t| values(m * k, 7919 + t, 97, 31.0)).collect();
            let taps: Vec<PackedA> = weights.iter().map(|w| PackedA::new(w, m, k)).collect();
            let offsets = [0, 1, 37];
            let (q0, nb) = (5, 200);
            let parts: Vec<_> = taps.iter().zip(offsets).collect();
            let mut dst = vec![7f32; m * nb];
            // SAFETY: checked support; views end at q0 + 37 + nb < n.
            unsafe { packed.gemm_sum(&parts, q0, nb, &mut dst, false) };
            for i in 0..m {
                for j in 0..nb {
                    let mut exact = 0f64;
                    let mut scale = 0f64;
                    for (w, o) in weights.iter().zip(offsets) {
                        for c in 0..k {
                            let (x, y) = (w[i * k + c], b[c * n + q0 + o + j]);
                            exact += round(x) * round(y);
                            scale += (x as f64 * y as f64).abs();
                        }
                    }
                    let got = dst[i * nb + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale.max(1.0),
                        "[{i}][{j}] (AMX off: {no_amx}): {got} vs {exact}"
                    );
                }
            }
        });
    }
}
