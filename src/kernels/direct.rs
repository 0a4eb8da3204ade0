//! The fused convolution on matrix products: weights packed once, outputs computed in bands
//! that fit in cache, with bias, residual and ReLU applied as each band is written back.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16::{self, Bf16Weights, Lhs, PackedB};
use super::epilogue::Epilogue;
use super::host::{f32_slice, tune_allocator, SyncPtr};
use super::im2col::{im2col, pack_taps, pad, pad_to, Geometry};
use super::matmul::matmul;
use super::profile;
use super::winograd::{winograd_input, Spec, TileGrid, Winograd, F2, F4, WINOGRAD_BAND_FLOATS};

/// A convolution with folded bias, ready for the fast CPU path.
#[derive(Debug, Clone)]
pub struct FusedConv2d {
    /// Stride 1: weights per tap, `[k·k][cout][cin]`; otherwise im2col order,
    /// `[cout][cin·k·k]`.
    packed: Vec<f32>,
    /// Winograd weights for 3×3 stride-1 convs.
    pub(super) winograd: Option<Winograd>,
    /// The weights again as bf16 left operands, for [`Precision::Bf16`].
    bf16: Option<Box<Bf16Weights>>,
    bias: Vec<f32>,
    pub(super) cin: usize,
    pub(super) cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl FusedConv2d {
    /// Prepares `weight` `(cout, cin, k, k)` and `bias` `(cout,)`; 3×3 stride-1 convolutions
    /// with padding 1 and at least 64 input channels use Winograd's F(4×4, 3×3), which needs
    /// 4× fewer multiplications.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        Self::with_algorithm(weight, bias, stride, padding, Algorithm::Auto)
    }

    /// As [`FusedConv2d::new`] with an explicit algorithm for eligible convolutions.
    pub fn with_algorithm(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        algorithm: Algorithm,
    ) -> Result<Self> {
        Self::with_options(weight, bias, (stride, padding), algorithm, Precision::F32)
    }

    /// As [`FusedConv2d::new`] with products at `precision`, eligible convolutions running
    /// `algorithm` (see [`Precision::algorithm`]).
    pub fn with_options(
        weight: &Tensor,
        bias: &Tensor,
        (stride, padding): (usize, usize),
        algorithm: Algorithm,
        precision: Precision,
    ) -> Result<Self> {
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 {
            candle_core::bail!("unsupported conv: kernel {k}×{k2}");
        }
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = bias.to_dtype(DType::F32)?.to_vec1()?;
        Self::from_host(
            &w,
            bias,
            (cout, cin, k),
            (stride, padding),
            algorithm,
            precision,
        )
    }

    /// The kernels from host weights `(cout, cin, k, k)`: training builds them every step,
    /// so this avoids tensor round trips and single-threaded strided copies.
    pub(crate) fn from_host(
        w: &[f32],
        bias: Vec<f32>,
        (cout, cin, k): (usize, usize, usize),
        (stride, padding): (usize, usize),
        algorithm: Algorithm,
        precision: Precision,
    ) -> Result<Self> {
        tune_allocator();
        if stride == 0 || w.len() != cout * cin * k * k || bias.len() != cout {
            candle_core::bail!(
                "unsupported conv: {} weights and {} biases for {cout}×{cin}×{k}×{k}, stride {stride}",
                w.len(),
                bias.len()
            );
        }
        // Stride 1 runs tap by tap: weights tap-major, `(k·k, cout, cin)`.
        let packed = if stride == 1 {
            pack_taps(w, cout, cin, k * k)
        } else {
            w.to_vec()
        };
        // Below 64 input channels the transforms cost more than the products save (at 64:
        // 262 vs 185 GFLOP/s for layer1 at 200×272).
        let eligible = k == 3 && stride == 1 && padding == 1 && cin >= 64;
        let winograd = match algorithm.spec() {
            Some(spec) if eligible => Some(Winograd::new(spec, w, cout, cin)),
            _ => None,
        };
        let bf16 = match precision {
            Precision::F32 => None,
            Precision::Bf16 if !bf16::supported() => {
                candle_core::bail!("bf16 products need a CPU with AVX512-BF16")
            }
            Precision::Bf16 => Some(Box::new(Bf16Weights::new(
                &packed,
                winograd.as_ref(),
                (cout, cin, k, stride),
            ))),
        };
        Ok(Self {
            winograd,
            bf16,
            packed,
            bias,
            cin,
            cout,
            k,
            stride,
            padding,
        })
    }

    /// Output spatial size for an input of `(h, w)`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |i: usize| (i + 2 * self.padding - self.k) / self.stride + 1;
        (o(h), o(w))
    }

    /// `relu?(conv(x) + bias [+ residual])` for an f32 CPU `x` of shape `(N, cin, H, W)`.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("the fused convolution runs on f32 CPU tensors only");
        }
        let x = x.contiguous()?;
        let op = ConvOp { conv: self, relu };
        let (n, _, h, w) = x.dims4()?;
        let (ho, wo) = self.output_size(h, w);
        let macs = (n * self.cout * self.cin * self.k * self.k * ho * wo) as f64;
        profile::timed(
            || self.profile_name(h, w),
            macs,
            || match residual {
                None => x.apply_op1_no_bwd(&op),
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?.to_dtype(DType::F32)?, &op),
            },
        )
    }

    /// The shape, input size and algorithm, as [`profile`] records them.
    fn profile_name(&self, h: usize, w: usize) -> String {
        let (k, s) = (self.k, self.stride);
        let algorithm = match &self.winograd {
            Some(wg) if h * w >= MIN_WINOGRAD_PIXELS => {
                format!("Winograd F({0}x{0})", wg.spec.t - 2)
            }
            _ if k == 1 && s == 1 && self.bf16.is_none() => "pointwise".into(),
            _ if s == 1 => "taps".into(),
            _ => "im2col".into(),
        };
        let precision = if self.bf16.is_some() { "bf16" } else { "f32" };
        format!(
            "conv {k}x{k}/{s} {}->{} on {h}x{w}, {algorithm}, {precision}",
            self.cin, self.cout
        )
    }

    /// One image: `x` is `cin × h × w`; `out` (`cout × ho × wo`) holds the residual on
    /// entry (or zeros) and `relu?(conv(x) + bias + residual)` on return.
    pub(crate) fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], relu: bool) {
        let (ho, wo) = self.output_size(h, w);
        let (k, p) = (self.k, self.padding);
        let epilogue = Epilogue {
            out: SyncPtr(out.as_mut_ptr()),
            bias: &self.bias,
            plane: ho * wo,
            wo,
            relu,
        };
        // On maps of a few tiles the per-tile products are too narrow to pay for the
        // transforms (8×8 in F(4×4): 90 vs 140 GFLOP/s for the taps).
        let winograd = self
            .winograd
            .as_ref()
            .filter(|_| h * w >= MIN_WINOGRAD_PIXELS);
        if let Some(wg) = winograd {
            match wg.spec.t {
                4 => self.run_winograd::<4, 2>(wg, x, h, w, &epilogue),
                _ => self.run_winograd::<6, 4>(wg, x, h, w, &epilogue),
            }
        } else if k == 1 && self.stride == 1 && self.bf16.is_none() {
            self.run_pointwise(x, h * w, out, relu);
        } else if self.stride == 1 {
            // Outputs on the padded width: column q is (q / wp, q % wp); q % wp ≥ wo is
            // scratch. Tap (ky, kx) reads the padded input shifted by ky·wp + kx.
            let (hp, wp) = (h + 2 * p, w + 2 * p);
            let padded;
            let input = if p == 0 {
                x
            } else {
                padded = pad(x, self.cin, h, w, p);
                &padded
            };
            let n = (ho - 1) * wp + wo;
            // bf16: the input rounded and paired once, each tap a shifted view of it.
            let packed_input = self
                .bf16
                .as_ref()
                .map(|_| PackedB::new(input, self.cin, hp * wp));
            self.for_each_band(n, self.cin, |q0, nb, dst, _| {
                if let (Some(b), Some(weights)) = (&packed_input, &self.bf16) {
                    let taps: Vec<_> = (0..k * k)
                        .map(|t| (weights.get(Lhs::Tap(t)), (t / k) * wp + t % k))
                        .collect();
                    // SAFETY: as below; the packed input has room for whole panels.
                    unsafe { b.gemm_sum(&taps, q0, nb, dst, false) };
                } else {
                    self.taps_f32(input, (hp * wp, wp), q0, nb, dst);
                }
                epilogue.write(dst, nb, |j| {
                    let q = q0 + j;
                    (q % wp < wo).then(|| (q / wp) * wo + q % wp)
                });
            });
        } else {
            let kk = self.cin * k * k;
            self.for_each_band(ho * wo, kk, |q0, nb, dst, cols| {
                self.im2col(x, h, w, q0, nb, cols);
                // SAFETY: cols is kk × nb, dst cout × nb.
                unsafe { self.product(dst, nb, false, (&self.packed, Lhs::Im2col), kk, cols, nb) };
                epilogue.write(dst, nb, |j| Some(q0 + j));
            });
        }
    }

    /// Stride 1, f32 products (or bf16 ones packed per product): `dst (cout × nb) =
    /// Σ_t W_t · x[:, q0 + o_t ..]` over the taps, `x` being `cin` padded planes of `plane`
    /// values `wp` wide.
    fn taps_f32(
        &self,
        x: &[f32],
        (plane, wp): (usize, usize),
        q0: usize,
        nb: usize,
        dst: &mut [f32],
    ) {
        let k = self.k;
        for (t, tap) in self.packed.chunks_exact(self.cout * self.cin).enumerate() {
            let offset = (t / k) * wp + t % k + q0;
            // SAFETY: the last column read is q0 + nb − 1 + (k−1)·wp + k−1 < hp·wp on every
            // input plane.
            unsafe {
                self.product(
                    dst,
                    nb,
                    t > 0,
                    (tap, Lhs::Tap(t)),
                    self.cin,
                    &x[offset..],
                    plane,
                )
            };
        }
    }

    /// A 1×1 convolution is one matrix product, `out += W · x`, which the `gemm` crate runs
    /// faster as a whole (its own blocking and threads) than in bands: 1.2–1.6× on the
    /// bottlenecks' narrow products. The bias joins `out` (holding the residual or zeros)
    /// before, the ReLU follows.
    fn run_pointwise(&self, x: &[f32], hw: usize, out: &mut [f32], relu: bool) {
        out.par_chunks_mut(hw)
            .zip(self.bias.par_iter())
            .for_each(|(plane, &b)| plane.iter_mut().for_each(|v| *v += b));
        // SAFETY: out is cout × hw, packed cout × cin, x cin × hw.
        unsafe {
            matmul(
                (self.cout, hw, self.cin),
                ((out.as_mut_ptr(), 1, hw), true),
                (self.packed.as_ptr(), 1, self.cin),
                (x.as_ptr(), 1, hw),
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        if relu {
            out.par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
    }

    /// Winograd F(M×M, 3×3) with T = M + 2: per T×T input tile, V = Bᵀ·d·B; per tile
    /// position ξ of T², M_ξ = U_ξ · V_ξ (a matrix product over channels); per output tile,
    /// Y = Aᵀ·M·A.
    fn run_winograd<const T: usize, const M: usize>(
        &self,
        wg: &Winograd,
        x: &[f32],
        h: usize,
        w: usize,
        epilogue: &Epilogue,
    ) {
        let tt = T * T;
        let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
        // Padded by 1, plus what completes the last tiles.
        let (hp, wp) = (M * th + 2, M * tw + 2);
        let padded = pad_to(x, self.cin, h, w, 1, hp, wp);
        let tiles = th * tw;
        let (cin, cout) = (self.cin, self.cout);
        let nt = (WINOGRAD_BAND_FLOATS / (tt * (cin + cout))).clamp(16, 1024);
        let nt = balanced_band(tiles, nt, 8, 1);
        // Rows of a power-of-two multiple of floats alias in the cache (measured: 256 tiles
        // in two bands of 128 run at 60 % of two of 129 and 127).
        let nt = if nt.is_multiple_of(8) { nt + 1 } else { nt };
        let bands = tiles.div_ceil(nt);
        let geo = TileGrid { hp, wp, tw, h, w };
        (0..bands).into_par_iter().for_each_init(
            || (vec![0f32; tt * cin * nt], vec![0f32; tt * cout * nt]),
            |(v, m), b| {
                let t0 = b * nt;
                let n = nt.min(tiles - t0);
                winograd_input::<T, M>(&padded, &geo, t0..t0 + n, &mut v[..tt * cin * n]);
                for xi in 0..tt {
                    let lhs = &wg.u[xi * cout * cin..][..cout * cin];
                    let rhs = &v[xi * cin * n..][..cin * n];
                    let dst = &mut m[xi * cout * n..][..cout * n];
                    // SAFETY: lhs is cout × cin, rhs cin × n, dst cout × n.
                    unsafe { self.product(dst, n, false, (lhs, Lhs::Winograd(xi)), cin, rhs, n) };
                }
                epilogue.write_winograd::<T, M>(&m[..tt * cout * n], t0..t0 + n, &geo);
            },
        );
    }

    /// Splits `n` output columns into bands run in parallel; each band gets a `cout × nb`
    /// accumulator and a `kdim × nb` scratch, sized so both stay in cache.
    fn for_each_band<F>(&self, n: usize, kdim: usize, f: F)
    where
        F: Fn(usize, usize, &mut [f32], &mut [f32]) + Sync,
    {
        let nb = (BAND_FLOATS / (self.cout + kdim)).clamp(32, 1024) / 16 * 16;
        let nb = balanced_band(n, nb, 64, 16);
        let nb = if nb.is_multiple_of(8) { nb + 1 } else { nb };
        let bands = n.div_ceil(nb);
        (0..bands).into_par_iter().for_each_init(
            || (vec![0f32; self.cout * nb], vec![0f32; kdim * nb]),
            |(dst, cols), b| {
                let q0 = b * nb;
                let len = nb.min(n - q0);
                f(
                    q0,
                    len,
                    &mut dst[..self.cout * len],
                    &mut cols[..kdim * len],
                );
            },
        );
    }

    /// im2col of output columns `q0..q0 + nb` into `cols` (`cin·k·k × nb`), one output-row
    /// segment at a time.
    fn im2col(&self, x: &[f32], h: usize, w: usize, q0: usize, nb: usize, cols: &mut [f32]) {
        let geometry = Geometry {
            k: self.k,
            stride: self.stride,
            padding: self.padding,
        };
        im2col(&geometry, x, h, w, q0, nb, cols);
    }

    /// `dst[co][j] (+)= Σ_c lhs[co][c] · rhs[c·rhs_rs + j]` for j < n, `dst` being
    /// `cout × n`, single-threaded (the bands are the parallelism).
    ///
    /// # Safety
    /// `lhs` must be `cout × kdim` and `rhs` hold `kdim` rows of `rhs_rs` with `n` readable
    /// values each.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        &self,
        dst: &mut [f32],
        n: usize,
        accumulate: bool,
        (lhs, which): (&[f32], Lhs),
        kdim: usize,
        rhs: &[f32],
        rhs_rs: usize,
    ) {
        if let Some(b) = &self.bf16 {
            return bf16::gemm(b.get(which), rhs, rhs_rs, n, dst, accumulate);
        }
        matmul(
            (self.cout, n, kdim),
            ((dst.as_mut_ptr(), 1, n), accumulate),
            (lhs.as_ptr(), 1, kdim),
            (rhs.as_ptr(), 1, rhs_rs),
            Parallelism::None,
        );
    }
}

impl FusedConv2d {
    /// Runs on a contiguous `(n, cin, h, w)` f32 slice, returning `(n, cout, ho, wo)`.
    pub(crate) fn run_batch(&self, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let (ho, wo) = self.output_size(h, w);
        let out_len = self.cout * ho * wo;
        let mut out = vec![0f32; n * out_len];
        for (i, o) in out.chunks_exact_mut(out_len).enumerate() {
            self.run(
                &x[i * self.cin * h * w..][..self.cin * h * w],
                h,
                w,
                o,
                false,
            );
        }
        out
    }
}

/// Precision of the convolutions' products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout (the default; matches torchvision to ~1e-5).
    #[default]
    F32,
    /// Weights and activations rounded to bfloat16 inside the products, accumulated in f32
    /// (CPUs with AVX512-BF16; see [`bf16::supported`]). Everything between the products
    /// (bias, residuals, ReLU, Winograd transforms, post-processing) stays f32, and
    /// [`crate::RetinaNet`] applies it to the FPN and heads only.
    Bf16,
}

impl Precision {
    /// The algorithm of eligible convolutions at this precision. F(4×4)'s transforms multiply
    /// entries by up to 5 before the products and cancel them after: with bf16 operands that
    /// is 6 % error; F(2×2)'s ±1, ½ keep it at 0.5 %.
    pub fn algorithm(self) -> Algorithm {
        match self {
            Precision::F32 => Algorithm::Winograd4,
            // With AMX tiles the products cost less than F(2×2)'s transforms, and direct
            // products round less.
            Precision::Bf16 if bf16::tiles() => Algorithm::Gemm,
            Precision::Bf16 => Algorithm::Winograd2,
        }
    }
}

/// How a 3×3 stride-1 convolution with at least 64 input channels is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// The default: F(4×4, 3×3).
    Auto,
    /// Matrix products per kernel tap (as every other convolution).
    Gemm,
    /// Winograd F(2×2, 3×3).
    Winograd2,
    /// Winograd F(4×4, 3×3).
    Winograd4,
}

impl Algorithm {
    /// The Winograd transforms of eligible convolutions, if any.
    fn spec(self) -> Option<&'static Spec> {
        match self {
            Algorithm::Gemm => None,
            Algorithm::Winograd2 => Some(&F2),
            Algorithm::Auto | Algorithm::Winograd4 => Some(&F4),
        }
    }
}

/// Floats of accumulator plus scratch per band: about 1 MB, a core's L2.
pub(super) const BAND_FLOATS: usize = 256 * 1024;

/// Smallest map (in pixels) that runs Winograd.
const MIN_WINOGRAD_PIXELS: usize = 12 * 12;

/// The length of the bands `total` items split into: about `max_len` (what fits in cache),
/// with as many bands as it takes to give every thread the same number, unless that would
/// make them shorter than `min_len`. Without this, a small feature map splits into one full
/// band and a sliver, and one core idles. Rounded up to a multiple of `align`.
fn balanced_band(total: usize, max_len: usize, min_len: usize, align: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Whole waves of `threads` bands; rounding the wave count to nearest may stretch bands
    // past `max_len` by up to half, which costs less than an extra wave of short bands.
    let waves = (total as f64 / (max_len * threads) as f64).round().max(1.0) as usize;
    let bands = (waves * threads).min(total.div_ceil(min_len)).max(1);
    total.div_ceil(bands).div_ceil(align) * align
}

struct ConvOp<'a> {
    conv: &'a FusedConv2d,
    relu: bool,
}

impl ConvOp<'_> {
    fn check(&self, layout: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.conv.cin {
            candle_core::bail!("conv expects {} input channels, got {c}", self.conv.cin);
        }
        if h + 2 * self.conv.padding < self.conv.k || w + 2 * self.conv.padding < self.conv.k {
            candle_core::bail!("conv input {h}×{w} smaller than its kernel");
        }
        Ok((n, c, h, w))
    }

    fn run(
        &self,
        x: &[f32],
        layout: &Layout,
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = self.check(layout)?;
        let (ho, wo) = self.conv.output_size(h, w);
        let out_len = self.conv.cout * ho * wo;
        let mut out = match residual {
            Some(r) if r.len() == n * out_len => r.to_vec(),
            Some(r) => {
                candle_core::bail!("residual has {} values, expected {}", r.len(), n * out_len)
            }
            None => vec![0f32; n * out_len],
        };
        for (i, o) in out.chunks_exact_mut(out_len).enumerate() {
            self.conv
                .run(&x[i * c * h * w..][..c * h * w], h, w, o, self.relu);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, self.conv.cout, ho, wo)),
        ))
    }
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s, l)?, l, None)
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s1, l1)?, l1, Some(f32_slice(s2, l2)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs;
    use candle_core::Device;

    fn check(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, h: usize, w: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
        let conv = FusedConv2d::new(&wt, &b, stride, pad).unwrap();
        let candle = |residual: Option<&Tensor>, relu: bool| {
            let y = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            let mut y = y
                .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            if let Some(r) = residual {
                y = (y + r).unwrap();
            }
            if relu {
                y.relu().unwrap()
            } else {
                y
            }
        };
        let reference = candle(None, true);
        let ours = conv.forward(&x, None, true).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        let err = max_abs(&(&ours - &reference).unwrap());
        assert!(err < 1e-4, "k{k} s{stride} p{pad} {h}×{w}: {err}");
        // With a residual.
        let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let reference = candle(Some(&r), false);
        let ours = conv.forward(&x, Some(&r), false).unwrap();
        assert!(max_abs(&(&ours - &reference).unwrap()) < 1e-4);
    }

    #[test]
    fn fused_conv_matches_candle() {
        check(8, 16, 1, 1, 0, 9, 13);
        check(8, 16, 3, 1, 1, 9, 13);
        check(8, 16, 3, 2, 1, 9, 13);
        check(3, 16, 7, 2, 3, 17, 22);
        check(8, 16, 1, 2, 0, 9, 13);
        check(5, 7, 3, 1, 1, 1, 1);
        check(5, 7, 3, 2, 1, 2, 3);
        check(40, 24, 3, 1, 1, 10, 9);
        check(33, 17, 3, 1, 1, 1, 2);
        // Winograd (64 input channels, above the pixel threshold) and a wide 1×1 product.
        check(64, 32, 3, 1, 1, 13, 14);
        check(96, 40, 1, 1, 0, 30, 31);
    }

    #[test]
    fn bf16_products_match_f32_within_bf16_rounding() {
        if !bf16::supported() {
            crate::kernels::skip_test(
                "kernels::direct::tests::bf16_products_match_f32_within_bf16_rounding",
                "this CPU has no AVX512-BF16, so the bf16 products were not compared with f32",
            );
            return;
        }
        let dev = Device::Cpu;
        // Taps (stride 1, with and without padding), im2col (strided), Winograd.
        for (cin, cout, k, s, p, h, w) in [
            (8, 16, 1, 1, 0, 9, 13),
            (8, 16, 3, 1, 1, 9, 13),
            (8, 16, 3, 2, 1, 9, 13),
            (3, 16, 7, 2, 3, 17, 22),
            (64, 32, 3, 1, 1, 13, 14),
            (130, 40, 3, 1, 1, 20, 17),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let fused = |precision: Precision, algorithm| {
                FusedConv2d::with_options(&wt, &b, (s, p), algorithm, precision).unwrap()
            };
            let f32c = fused(Precision::F32, Precision::F32.algorithm());
            let a = f32c.forward(&x, None, false).unwrap();
            // bf16's own choice (taps with AMX, else F(2×2)), then the other.
            for algorithm in [Algorithm::Gemm, Algorithm::Winograd2] {
                let o = fused(Precision::Bf16, algorithm)
                    .forward(&x, None, false)
                    .unwrap();
                let rel = max_abs(&(&a - &o).unwrap()) / max_abs(&a);
                assert!(
                    rel < 1e-2,
                    "k{k} s{s} {cin}->{cout} {h}x{w} {algorithm:?}: bf16 rel err {rel}"
                );
            }
        }
    }

    #[test]
    fn winograd_matches_direct() {
        let dev = Device::Cpu;
        for (h, w) in [(12, 17), (13, 16), (15, 11), (17, 9)] {
            let x = Tensor::randn(0f32, 1.0, (1, 128, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.05, (48, 128, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
            let direct = FusedConv2d::with_algorithm(&wt, &b, 1, 1, Algorithm::Gemm).unwrap();
            assert!(direct.winograd.is_none());
            let d = direct.forward(&x, None, false).unwrap();
            let scale = max_abs(&d);
            for (algorithm, bound) in [(Algorithm::Winograd2, 2e-6), (Algorithm::Winograd4, 2e-5)] {
                let wino = FusedConv2d::with_algorithm(&wt, &b, 1, 1, algorithm).unwrap();
                assert!(wino.winograd.is_some());
                let a = wino.forward(&x, None, false).unwrap();
                let rel = max_abs(&(&a - &d).unwrap()) / scale;
                assert!(rel < bound, "{algorithm:?} {h}×{w}: rel err {rel}");
            }
        }
    }
}
