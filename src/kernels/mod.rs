//! Fast CPU convolutions for inference.
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
//! while the result is compacted. Other devices and dtypes use Candle's ops; training uses
//! the differentiable forms in [`train`].

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Module, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

pub mod bf16;
pub mod train;
pub use train::{conv2d_train, conv2d_train_fused, TrainBias, TrainConv2d};

/// A convolution with folded bias, ready for the fast CPU path.
#[derive(Debug, Clone)]
pub struct FusedConv2d {
    /// Stride 1: weights per tap, `[k·k][cout][cin]`; otherwise im2col order,
    /// `[cout][cin·k·k]`.
    packed: Vec<f32>,
    /// Winograd weights for 3×3 stride-1 convs.
    winograd: Option<Winograd>,
    /// The weights again as bf16 left operands, for [`Precision::Bf16`].
    bf16: Option<Box<Bf16Weights>>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl FusedConv2d {
    /// Prepares `weight` `(cout, cin, k, k)` and `bias` `(cout,)`; 3×3 stride-1 convolutions
    /// with padding 1 and at least 64 input channels use Winograd's F(4×4, 3×3), which needs
    /// 4× fewer multiplications.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        Self::with_winograd(weight, bias, stride, padding, true)
    }

    /// As [`FusedConv2d::new`], choosing whether eligible convolutions use Winograd.
    pub fn with_winograd(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        winograd: bool,
    ) -> Result<Self> {
        let algorithm = if winograd {
            Algorithm::Auto
        } else {
            Algorithm::Gemm
        };
        Self::with_algorithm(weight, bias, stride, padding, algorithm)
    }

    /// As [`FusedConv2d::new`] with an explicit algorithm for eligible convolutions.
    pub fn with_algorithm(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        algorithm: Algorithm,
    ) -> Result<Self> {
        Self::with_spec(
            weight,
            bias,
            stride,
            padding,
            algorithm.spec(),
            Precision::F32,
        )
    }

    /// As [`FusedConv2d::new`] at the given precision of the products.
    pub fn with_precision(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        precision: Precision,
    ) -> Result<Self> {
        // F(4×4)'s transforms multiply entries by up to 5 before the products and cancel
        // them after: with bf16 operands that is 6 % error; F(2×2)'s ±1, ½ keep it at 0.5 %.
        let spec = match precision {
            Precision::F32 => &F4,
            Precision::Bf16 => &F2,
        };
        Self::with_spec(weight, bias, stride, padding, Some(spec), precision)
    }

    fn with_spec(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
        spec: Option<&'static Spec>,
        precision: Precision,
    ) -> Result<Self> {
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 {
            candle_core::bail!("unsupported conv: kernel {k}×{k2}");
        }
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = bias.to_dtype(DType::F32)?.to_vec1()?;
        Self::from_host(&w, bias, (cout, cin, k), (stride, padding), spec, precision)
    }

    /// The kernels from host weights `(cout, cin, k, k)`: training builds them every step,
    /// so this avoids tensor round trips and single-threaded strided copies.
    fn from_host(
        w: &[f32],
        bias: Vec<f32>,
        (cout, cin, k): (usize, usize, usize),
        (stride, padding): (usize, usize),
        spec: Option<&'static Spec>,
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
        let winograd = match spec {
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
        match residual {
            None => x.apply_op1_no_bwd(&op),
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?.to_dtype(DType::F32)?, &op),
        }
    }

    /// One image: `x` is `cin × h × w`; `out` (`cout × ho × wo`) holds the residual on
    /// entry (or zeros) and `relu?(conv(x) + bias + residual)` on return.
    fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], relu: bool) {
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
            let tap_len = self.cout * self.cin;
            self.for_each_band(n, self.cin, |q0, nb, dst, _| {
                for (t, tap) in self.packed.chunks_exact(tap_len).enumerate() {
                    let offset = (t / k) * wp + t % k + q0;
                    // SAFETY: the last column read is q0 + nb − 1 + (k−1)·wp + k−1 <
                    // hp·wp on every input plane.
                    unsafe {
                        self.product(
                            dst,
                            nb,
                            t > 0,
                            (tap, Lhs::Tap(t)),
                            self.cin,
                            &input[offset..],
                            hp * wp,
                        )
                    };
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
            gemm(
                self.cout,
                hw,
                self.cin,
                out.as_mut_ptr(),
                1,
                hw as isize,
                true,
                self.packed.as_ptr(),
                1,
                self.cin as isize,
                x.as_ptr(),
                1,
                hw as isize,
                1.0,
                1.0,
                false,
                false,
                false,
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
                winograd_input::<T, M>(&padded, cin, &geo, t0, n, &mut v[..tt * cin * n]);
                for xi in 0..tt {
                    let lhs = &wg.u[xi * cout * cin..][..cout * cin];
                    let rhs = &v[xi * cin * n..][..cin * n];
                    let dst = &mut m[xi * cout * n..][..cout * n];
                    // SAFETY: lhs is cout × cin, rhs cin × n, dst cout × n.
                    unsafe { self.product(dst, n, false, (lhs, Lhs::Winograd(xi)), cin, rhs, n) };
                }
                epilogue.write_winograd::<T, M>(&m[..tt * cout * n], cout, n, t0, &geo);
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
    unsafe fn product(
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
        gemm(
            self.cout,
            n,
            kdim,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            kdim as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Kernel size, stride and padding of a square convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Output size for an input of `(h, w)`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |i: usize| (i + 2 * self.padding - self.k) / self.stride + 1;
        (o(h), o(w))
    }
}

/// im2col of output columns `q0..q0 + nb` of one image (`cin × h × w`) into `cols`
/// (`cin·k·k × nb`), one output-row segment at a time.
/// `(cout, cin, taps)` weights as `(taps, cout, cin)`, in parallel.
fn pack_taps(w: &[f32], cout: usize, cin: usize, taps: usize) -> Vec<f32> {
    let mut packed = vec![0f32; w.len()];
    packed
        .par_chunks_mut(cin)
        .enumerate()
        .for_each(|(row, dst)| {
            let (t, co) = (row / cout, row % cout);
            for (ci, d) in dst.iter_mut().enumerate() {
                *d = w[(co * cin + ci) * taps + t];
            }
        });
    packed
}

pub(crate) fn im2col(
    g: &Geometry,
    x: &[f32],
    h: usize,
    w: usize,
    q0: usize,
    nb: usize,
    cols: &mut [f32],
) {
    let (k, s, p) = (g.k, g.stride, g.padding);
    let wo = g.output_size(h, w).1;
    for (row, col) in cols.chunks_exact_mut(nb).enumerate() {
        let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
        let plane = &x[ci * h * w..][..h * w];
        let mut j = 0;
        while j < nb {
            let (yo, xo0) = ((q0 + j) / wo, (q0 + j) % wo);
            let len = (wo - xo0).min(nb - j);
            let seg = &mut col[j..j + len];
            j += len;
            let iy = (yo * s + ky).wrapping_sub(p);
            if iy >= h {
                seg.fill(0.0);
                continue;
            }
            let src = &plane[iy * w..][..w];
            for (d, xo) in seg.iter_mut().zip(xo0..) {
                let ix = (xo * s + kx).wrapping_sub(p);
                *d = if ix < w { src[ix] } else { 0.0 };
            }
        }
    }
}

/// Floats of accumulator plus scratch per band: about 1 MB, a core's L2.
const BAND_FLOATS: usize = 256 * 1024;

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

/// Floats of Winograd scratch (transformed inputs and products) per band, about 8 MB: the
/// products re-pack their weight operand per call, so bands need a few hundred tiles.
const WINOGRAD_BAND_FLOATS: usize = 2 * 1024 * 1024;

/// A Winograd algorithm F(m×m, 3×3): tile size t = m + 2 and its transforms.
#[derive(Debug)]
struct Spec {
    t: usize,
    /// Kernel transform G, t × 3 (the input and output transforms are written out in `bt`
    /// and `at`).
    g: &'static [f64],
}

/// F(2×2, 3×3): 2.25× fewer multiplications than direct, and as accurate.
const F2: Spec = Spec {
    t: 4,
    g: &[1., 0., 0., 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0., 0., 1.],
};

/// F(4×4, 3×3) on the points 0, ±1, ±2 (Lavin and Gray): 4× fewer multiplications; its
/// transforms cost a little precision (about 1e-6 relative per layer).
const F4: Spec = Spec {
    t: 6,
    g: &[
        0.25,
        0.,
        0.,
        -1. / 6.,
        -1. / 6.,
        -1. / 6.,
        -1. / 6.,
        1. / 6.,
        -1. / 6.,
        1. / 24.,
        1. / 12.,
        1. / 6.,
        1. / 24.,
        -1. / 12.,
        1. / 6.,
        0.,
        0.,
        1.,
    ],
};

/// Transformed weights of a 3×3 convolution.
#[derive(Debug, Clone)]
struct Winograd {
    spec: &'static Spec,
    /// U = G·g·Gᵀ, `[t²][cout][cin]`.
    u: Vec<f32>,
}

impl Winograd {
    fn new(spec: &'static Spec, w: &[f32], cout: usize, cin: usize) -> Self {
        let t = spec.t;
        let pairs = cout * cin;
        // U_ij = Σ_rc G_ir·G_jc·g_rc for every (out, in) pair: with the kernel taps as planes
        // over the pairs, each of the t² outputs is a 9-term combination of planes, which
        // vectorises (training transforms every wide kernel once per step).
        let coef: Vec<[f32; 9]> = (0..t * t)
            .map(|e| {
                let (i, j) = (e / t, e % t);
                std::array::from_fn(|rc| (spec.g[i * 3 + rc / 3] * spec.g[j * 3 + rc % 3]) as f32)
            })
            .collect();
        let mut u = vec![0f32; t * t * pairs];
        const CHUNK: usize = 1024;
        let out = SyncPtr(u.as_mut_ptr());
        (0..pairs.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
            let (p0, len) = (c * CHUNK, CHUNK.min(pairs - c * CHUNK));
            let mut taps = vec![0f32; 9 * len];
            for (p, g) in w[p0 * 9..(p0 + len) * 9].chunks_exact(9).enumerate() {
                for (rc, &v) in g.iter().enumerate() {
                    taps[rc * len + p] = v;
                }
            }
            let mut acc = vec![0f32; len];
            for (e, k) in coef.iter().enumerate() {
                acc.fill(0.0);
                for (rc, plane) in taps.chunks_exact(len).enumerate() {
                    let kv = k[rc];
                    if kv != 0.0 {
                        acc.iter_mut().zip(plane).for_each(|(a, &v)| *a += kv * v);
                    }
                }
                // SAFETY: chunks write disjoint ranges p0..p0 + len of each output plane.
                unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.at(e * pairs + p0), len) };
            }
        });
        Self { spec, u }
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

/// Which constant operand a product multiplies by.
#[derive(Debug, Clone, Copy)]
enum Lhs {
    /// Kernel tap `t` (stride-1 convolutions), `cout × cin`.
    Tap(usize),
    /// The whole kernel in im2col order (strided convolutions), `cout × cin·k·k`.
    Im2col,
    /// Winograd position `ξ`, `cout × cin`.
    Winograd(usize),
}

/// The bf16 forms of a convolution's constant operands.
#[derive(Debug, Clone)]
struct Bf16Weights {
    taps: Vec<bf16::PackedA>,
    im2col: Option<bf16::PackedA>,
    winograd: Vec<bf16::PackedA>,
}

impl Bf16Weights {
    /// From the f32 packing (`[tap][cout][cin]` for stride 1, `[cout][cin·k·k]` otherwise)
    /// and the Winograd weights.
    fn new(
        packed: &[f32],
        wg: Option<&Winograd>,
        (cout, cin, k, stride): (usize, usize, usize, usize),
    ) -> Self {
        let per = |v: &[f32]| {
            v.chunks_exact(cout * cin)
                .map(|m| bf16::PackedA::new(m, cout, cin))
                .collect()
        };
        Self {
            taps: if stride == 1 { per(packed) } else { Vec::new() },
            im2col: (stride != 1).then(|| bf16::PackedA::new(packed, cout, cin * k * k)),
            winograd: wg.map_or_else(Vec::new, |w| per(&w.u)),
        }
    }

    fn get(&self, which: Lhs) -> &bf16::PackedA {
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

/// Geometry of the tiles over a padded image.
struct TileGrid {
    hp: usize,
    wp: usize,
    /// Tiles per row.
    tw: usize,
    /// Output size.
    h: usize,
    w: usize,
}

/// Bᵀ·d for one column d of a tile: F(2×2, 3×3) for T = 4, F(4×4, 3×3) for T = 6.
#[inline(always)]
fn bt<const T: usize>(d: [f32; T]) -> [f32; T] {
    let mut o = [0f32; T];
    if T == 4 {
        o[0] = d[0] - d[2];
        o[1] = d[1] + d[2];
        o[2] = d[2] - d[1];
        o[3] = d[1] - d[3];
    } else {
        o[0] = 4.0 * d[0] - 5.0 * d[2] + d[4];
        o[1] = -4.0 * d[1] - 4.0 * d[2] + d[3] + d[4];
        o[2] = 4.0 * d[1] - 4.0 * d[2] - d[3] + d[4];
        o[3] = -2.0 * d[1] - d[2] + 2.0 * d[3] + d[4];
        o[4] = 2.0 * d[1] - d[2] - 2.0 * d[3] + d[4];
        o[5] = 4.0 * d[1] - 5.0 * d[3] + d[5];
    }
    o
}

/// Aᵀ·m for one column m of a transformed tile.
#[inline(always)]
fn at<const T: usize, const M: usize>(m: [f32; T]) -> [f32; M] {
    let mut o = [0f32; M];
    if T == 4 {
        o[0] = m[0] + m[1] + m[2];
        o[1] = m[1] - m[2] - m[3];
    } else {
        o[0] = m[0] + m[1] + m[2] + m[3] + m[4];
        o[1] = m[1] - m[2] + 2.0 * (m[3] - m[4]);
        o[2] = m[1] + m[2] + 4.0 * (m[3] + m[4]);
        o[3] = m[1] - m[2] + 8.0 * (m[3] - m[4]) + m[5];
    }
    o
}

/// V = Bᵀ·d·B for `n` tiles from `t0` of every channel, into `v` laid out `[T²][cin][n]`.
fn winograd_input<const T: usize, const M: usize>(
    x: &[f32],
    cin: usize,
    grid: &TileGrid,
    t0: usize,
    n: usize,
    v: &mut [f32],
) {
    if T == 4 {
        // F(2×2)'s transforms are a few additions: gathering into lanes costs more.
        return winograd_input_per_tile::<T, M>(x, cin, grid, t0, n, v);
    }
    let (hp, wp) = (grid.hp, grid.wp);
    for c in 0..cin {
        let plane = &x[c * hp * wp..][..hp * wp];
        // LANES tiles at a time: gathered into lane arrays, the transforms vectorise across
        // tiles and each V_ξ row is stored contiguously.
        let mut j = 0;
        while j < n {
            let lanes = LANES.min(n - j);
            let mut d = [[[0f32; LANES]; T]; T];
            for l in 0..lanes {
                let (ty, tx) = ((t0 + j + l) / grid.tw, (t0 + j + l) % grid.tw);
                let base = M * ty * wp + M * tx;
                for (r, row) in d.iter_mut().enumerate() {
                    for (col, lane) in row.iter_mut().enumerate() {
                        lane[l] = plane[base + r * wp + col];
                    }
                }
            }
            // Bᵀ·d column by column, then ·B row by row.
            let mut tmp = [[[0f32; LANES]; T]; T];
            for col in 0..T {
                for l in 0..LANES {
                    let o = bt::<T>(std::array::from_fn(|r| d[r][col][l]));
                    for (i, &val) in o.iter().enumerate() {
                        tmp[i][col][l] = val;
                    }
                }
            }
            for (i, row) in tmp.iter().enumerate() {
                let mut out = [[0f32; LANES]; T];
                for l in 0..LANES {
                    let o = bt::<T>(std::array::from_fn(|cc| row[cc][l]));
                    for (jj, &val) in o.iter().enumerate() {
                        out[jj][l] = val;
                    }
                }
                for (jj, lane) in out.iter().enumerate() {
                    v[((i * T + jj) * cin + c) * n + j..][..lanes].copy_from_slice(&lane[..lanes]);
                }
            }
            j += lanes;
        }
    }
}

/// [`winograd_input`] one tile at a time.
fn winograd_input_per_tile<const T: usize, const M: usize>(
    x: &[f32],
    cin: usize,
    grid: &TileGrid,
    t0: usize,
    n: usize,
    v: &mut [f32],
) {
    let (hp, wp) = (grid.hp, grid.wp);
    for c in 0..cin {
        let plane = &x[c * hp * wp..][..hp * wp];
        for j in 0..n {
            let (ty, tx) = ((t0 + j) / grid.tw, (t0 + j) % grid.tw);
            let base = M * ty * wp + M * tx;
            // Bᵀ·d column by column, then ·B row by row.
            let mut tmp = [[0f32; T]; T];
            for col in 0..T {
                let d: [f32; T] = std::array::from_fn(|r| plane[base + r * wp + col]);
                let b = bt(d);
                for (i, &val) in b.iter().enumerate() {
                    tmp[i][col] = val;
                }
            }
            for (i, row) in tmp.iter().enumerate() {
                for (jj, &val) in bt(*row).iter().enumerate() {
                    v[((i * T + jj) * cin + c) * n + j] = val;
                }
            }
        }
    }
}

/// Tiles transformed together in the Winograd transforms.
const LANES: usize = 16;

/// A pointer shared by bands that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: bands write disjoint output elements (each output position belongs to one band).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The element `i` places further (a method, so closures capture the whole `SyncPtr`).
    ///
    /// # Safety
    /// `i` must lie inside the allocation.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// Writes `relu?(acc + bias + residual)` for a band to the output planes.
struct Epilogue<'a> {
    out: SyncPtr,
    bias: &'a [f32],
    plane: usize,
    wo: usize,
    relu: bool,
}

impl Epilogue<'_> {
    /// `pos(j)` maps band column j to its position in an output plane, or `None` for scratch.
    fn write(&self, acc: &[f32], nb: usize, pos: impl Fn(usize) -> Option<usize>) {
        let _ = self.wo;
        let positions: Vec<Option<usize>> = (0..nb).map(pos).collect();
        for (co, (row, &b)) in acc.chunks_exact(nb).zip(self.bias).enumerate() {
            let base = co * self.plane;
            for (&v, p) in row.iter().zip(&positions) {
                if let Some(p) = *p {
                    // SAFETY: base + p < cout · plane, and no other band writes it.
                    unsafe {
                        let o = self.out.0.add(base + p);
                        let y = v + b + *o;
                        *o = if self.relu { y.max(0.0) } else { y };
                    }
                }
            }
        }
    }
}

impl Epilogue<'_> {
    /// Y = Aᵀ·M·A for every (cout, tile) of a band, then bias, residual and ReLU.
    fn write_winograd<const T: usize, const M: usize>(
        &self,
        m: &[f32],
        cout: usize,
        n: usize,
        t0: usize,
        grid: &TileGrid,
    ) {
        if T == 4 {
            return self.write_winograd_per_tile::<T, M>(m, cout, n, t0, grid);
        }
        for (co, &b) in self.bias.iter().enumerate().take(cout) {
            let mut j = 0;
            while j < n {
                let lanes = LANES.min(n - j);
                let mut mv = [[[0f32; LANES]; T]; T];
                for (r, row) in mv.iter_mut().enumerate() {
                    for (col, lane) in row.iter_mut().enumerate() {
                        let src = &m[((r * T + col) * cout + co) * n + j..][..lanes];
                        lane[..lanes].copy_from_slice(src);
                    }
                }
                // Aᵀ·M column by column, then ·A row by row, across LANES tiles at once.
                let mut am = [[[0f32; LANES]; T]; M];
                for col in 0..T {
                    for l in 0..LANES {
                        let o = at::<T, M>(std::array::from_fn(|r| mv[r][col][l]));
                        for (i, &val) in o.iter().enumerate() {
                            am[i][col][l] = val;
                        }
                    }
                }
                let mut y = [[[0f32; LANES]; M]; M];
                for (i, row) in am.iter().enumerate() {
                    for l in 0..LANES {
                        let o = at::<T, M>(std::array::from_fn(|cc| row[cc][l]));
                        for (xx, &val) in o.iter().enumerate() {
                            y[i][xx][l] = val;
                        }
                    }
                }
                for l in 0..lanes {
                    let (ty, tx) = ((t0 + j + l) / grid.tw, (t0 + j + l) % grid.tw);
                    for (y_off, row) in y.iter().enumerate() {
                        let yy = M * ty + y_off;
                        if yy >= grid.h {
                            continue;
                        }
                        for (xx_off, lane) in row.iter().enumerate() {
                            let xx = M * tx + xx_off;
                            if xx >= grid.w {
                                continue;
                            }
                            // SAFETY: (co, yy, xx) is inside the output and belongs to this
                            // band.
                            unsafe {
                                let o = self.out.0.add(co * self.plane + yy * self.wo + xx);
                                let r = lane[l] + b + *o;
                                *o = if self.relu { r.max(0.0) } else { r };
                            }
                        }
                    }
                }
                j += lanes;
            }
        }
    }
}

impl Epilogue<'_> {
    /// [`Epilogue::write_winograd`] one tile at a time.
    fn write_winograd_per_tile<const T: usize, const M: usize>(
        &self,
        m: &[f32],
        cout: usize,
        n: usize,
        t0: usize,
        grid: &TileGrid,
    ) {
        for (co, &b) in self.bias.iter().enumerate().take(cout) {
            for j in 0..n {
                // Aᵀ·M column by column, then ·A row by row.
                let mut am = [[0f32; T]; M];
                for col in 0..T {
                    let mc: [f32; T] =
                        std::array::from_fn(|r| m[((r * T + col) * cout + co) * n + j]);
                    for (i, &val) in at::<T, M>(mc).iter().enumerate() {
                        am[i][col] = val;
                    }
                }
                let (ty, tx) = ((t0 + j) / grid.tw, (t0 + j) % grid.tw);
                for (y_off, row) in am.iter().enumerate() {
                    let y = M * ty + y_off;
                    if y >= grid.h {
                        continue;
                    }
                    for (xx_off, &val) in at::<T, M>(*row).iter().enumerate() {
                        let xx = M * tx + xx_off;
                        if xx >= grid.w {
                            continue;
                        }
                        // SAFETY: (co, y, xx) is inside the output and belongs to this band.
                        unsafe {
                            let o = self.out.0.add(co * self.plane + y * self.wo + xx);
                            let r = val + b + *o;
                            *o = if self.relu { r.max(0.0) } else { r };
                        }
                    }
                }
            }
        }
    }
}

/// Zero-pads each of `c` planes of `h × w` by `p` on every side.
fn pad(x: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    pad_to(x, c, h, w, p, h + 2 * p, w + 2 * p)
}

/// Copies each of `c` planes of `h × w` to offset `(p, p)` of a zeroed `hp × wp` plane.
fn pad_to(x: &[f32], c: usize, h: usize, w: usize, p: usize, hp: usize, wp: usize) -> Vec<f32> {
    let mut out = vec![0f32; c * hp * wp];
    out.par_chunks_mut(hp * wp)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(w).enumerate() {
                dst[(y + p) * wp + p..][..w].copy_from_slice(row);
            }
        });
    out
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

/// Runs `f` on the values of a contiguous f32 CPU tensor in place; `None` for any other
/// tensor (the caller falls back to Candle's ops).
pub(crate) fn host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f32_slice(cpu, layout).ok().map(f),
        _ => None,
    }
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => {
            Ok(&v[l.start_offset()..][..l.shape().elem_count()])
        }
        _ => Err(Error::Msg(
            "fused conv needs a contiguous f32 tensor".into(),
        )),
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

/// `(N, C, H, W)` → `(N, H, W, C)`, contiguous and differentiable: the head's outputs per
/// anchor. On f32 CPU tensors a parallel blocked transpose (Candle's strided copy is
/// single-threaded, and the class outputs are ~10⁷ values per training batch).
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return x.permute((0, 2, 3, 1))?.contiguous();
    }
    let y = x.contiguous()?.apply_op1(Transpose {
        rows: c,
        inverse: false,
    })?;
    y.reshape((n, h, w, c))
}

/// Per image, `(rows, cols)` → `(cols, rows)` (or back with `inverse`), where the input is
/// `(N, rows, cols...)`.
struct Transpose {
    rows: usize,
    inverse: bool,
}

/// Positions per block of [`Transpose`]: the block's output stays in L2.
const TRANSPOSE_BLOCK: usize = 64;

fn transpose_images(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    let per = rows * cols;
    out.par_chunks_mut(TRANSPOSE_BLOCK * rows)
        .enumerate()
        .for_each(|(b, dst)| {
            // Output row q is column q % cols of image q / cols.
            let first = b * TRANSPOSE_BLOCK;
            for (j, row) in dst.chunks_exact_mut(rows).enumerate() {
                let q = first + j;
                let (img, col) = (q / cols, q % cols);
                let src = &x[img * per..][..per];
                for (r, d) in row.iter_mut().enumerate() {
                    *d = src[r * cols + col];
                }
            }
        });
    out
}

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "channels-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let dims = layout.shape().dims();
        let n = dims[0];
        let per = layout.shape().elem_count() / n.max(1);
        let (rows, cols) = if self.inverse {
            (per / self.rows, self.rows)
        } else {
            (self.rows, per / self.rows)
        };
        let out = transpose_images(x, rows, cols);
        Ok((CpuStorage::F32(out), Shape::from((n, cols, rows))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Transpose {
            rows: self.rows,
            inverse: !self.inverse,
        };
        let g = grad.contiguous()?.apply_op1_no_bwd(&back)?;
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// `MaxPool2d(3, stride 2, padding 1)` on an f32 CPU tensor in one parallel pass (Candle's
/// pool has no padding, so it would need two padded copies first). Not differentiable.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MaxPool)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for (y, row) in dst.chunks_exact_mut(wo).enumerate() {
                    let ys = (2 * y).saturating_sub(1)..(2 * y + 2).min(h);
                    for (xo, d) in row.iter_mut().enumerate() {
                        let xs = (2 * xo).saturating_sub(1)..(2 * xo + 2).min(w);
                        let mut m = f32::NEG_INFINITY;
                        for yy in ys.clone() {
                            for &v in &plane[yy * w + xs.start..yy * w + xs.end] {
                                m = m.max(v);
                            }
                        }
                        *d = m;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// Makes glibc's malloc keep freed memory for reuse instead of mapping fresh pages for every
/// large buffer: CPU inference allocates tens of megabytes per layer, and the page faults of
/// fresh mappings cost as much as the arithmetic of the smaller convolutions. Process-wide
/// and idempotent; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// A plain `candle_nn::Conv2d` (used for training) or its fused inference form.
#[derive(Debug, Clone)]
pub enum Conv {
    /// Candle's convolution, differentiable.
    Plain(candle_nn::Conv2d),
    /// The fast inference path.
    Fused(FusedConv2d),
}

impl Conv {
    /// `relu?(conv(x) [+ residual])`.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        match self {
            Conv::Fused(f) => f.forward(x, residual, relu),
            Conv::Plain(c) => plain_forward(c, x, residual, relu),
        }
    }

    /// Replaces a plain convolution by its fused form (weights scaled per output channel by
    /// `scale` and shifted by `shift`, i.e. a folded batch norm, when given).
    pub fn fuse(
        &mut self,
        scale_shift: Option<(&Tensor, &Tensor)>,
        precision: Precision,
    ) -> Result<()> {
        self.fuse_with(scale_shift, |w, b, s, p| {
            FusedConv2d::with_precision(w, b, s, p, precision)
        })
    }

    /// As [`Conv::fuse`] for a frozen layer of a model in training: the same algorithm as
    /// the trained layers, since Winograd's error in the frozen stages' output pushed deep
    /// float32 gradients past the torchvision parity tolerance.
    pub fn fuse_frozen(&mut self, scale_shift: Option<(&Tensor, &Tensor)>) -> Result<()> {
        self.fuse_with(scale_shift, |w, b, s, p| {
            FusedConv2d::with_algorithm(w, b, s, p, train::TRAIN_ALGORITHM)
        })
    }

    fn fuse_with(
        &mut self,
        scale_shift: Option<(&Tensor, &Tensor)>,
        make: impl FnOnce(&Tensor, &Tensor, usize, usize) -> Result<FusedConv2d>,
    ) -> Result<()> {
        let Conv::Plain(c) = self else {
            return Ok(());
        };
        let cfg = c.config();
        let w = c.weight();
        if cfg.dilation != 1 || cfg.groups != 1 || !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Ok(());
        }
        let cout = c.weight().dim(0)?;
        let bias = match c.bias() {
            Some(b) => b.clone(),
            None => Tensor::zeros(cout, c.weight().dtype(), c.weight().device())?,
        };
        let (weight, bias) = match scale_shift {
            None => (c.weight().clone(), bias),
            Some((scale, shift)) => {
                let s = scale.flatten_all()?;
                let w = c.weight().broadcast_mul(&s.reshape((cout, 1, 1, 1))?)?;
                let b = ((bias * &s)? + shift.flatten_all()?)?;
                (w, b)
            }
        };
        *self = Conv::Fused(make(&weight, &bias, cfg.stride, cfg.padding)?);
        Ok(())
    }
}

/// `relu?(y [+ residual])` with Candle's ops: the unfused tail of a convolution.
pub(crate) fn add_relu(y: Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// A differentiable convolution with its bias, residual and ReLU fused (see [`train`]).
fn plain_forward(
    c: &candle_nn::Conv2d,
    x: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let cfg = c.config();
    if cfg.dilation != 1 || cfg.groups != 1 {
        return add_relu(c.forward(x)?, residual, relu);
    }
    let bias = c.bias().map_or(TrainBias::None, TrainBias::Learned);
    conv2d_train_fused(x, c.weight(), cfg.stride, cfg.padding, bias, residual, relu)
}

/// A convolution ready to run on several inputs with the same weights (see [`Conv::prepare`]).
#[derive(Debug)]
pub enum PreparedConv<'a> {
    /// Runs as [`Conv::forward_with`].
    Direct(&'a Conv),
    /// A trainable CPU convolution with its kernels packed once.
    Train(std::sync::Arc<TrainConv2d>),
}

impl Conv {
    /// Prepares the kernels once for several inputs: a trainable convolution on the CPU then
    /// packs its weights once per step instead of once per feature map.
    pub fn prepare(&self) -> Result<PreparedConv<'_>> {
        self.prepare_with(train::TRAIN_ALGORITHM)
    }

    /// [`Self::prepare`], a trainable convolution's forward running `algorithm` (see
    /// [`TrainConv2d::with_algorithm`]).
    pub fn prepare_with(&self, algorithm: Algorithm) -> Result<PreparedConv<'_>> {
        let Conv::Plain(c) = self else {
            return Ok(PreparedConv::Direct(self));
        };
        let cfg = c.config();
        if cfg.dilation != 1 || cfg.groups != 1 {
            return Ok(PreparedConv::Direct(self));
        }
        let bias = c.bias().map_or(TrainBias::None, TrainBias::Learned);
        Ok(
            match TrainConv2d::with_algorithm(c.weight(), bias, cfg.stride, cfg.padding, algorithm)?
            {
                Some(t) => PreparedConv::Train(t),
                None => PreparedConv::Direct(self),
            },
        )
    }
}

impl PreparedConv<'_> {
    /// `relu?(conv(x) [+ residual])`.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        match self {
            PreparedConv::Direct(c) => c.forward_with(x, residual, relu),
            PreparedConv::Train(t) => t.forward(x, residual, relu),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let err = (&ours - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let err = err.to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "k{k} s{stride} p{pad} {h}×{w}: {err}");
        // With a residual.
        let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let reference = candle(Some(&r), false);
        let ours = conv.forward(&x, Some(&r), false).unwrap();
        let err = (&ours - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-4);
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
            eprintln!("skipped: this CPU has no AVX512-BF16");
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
            let f32c = FusedConv2d::with_precision(&wt, &b, s, p, Precision::F32).unwrap();
            let bf = FusedConv2d::with_precision(&wt, &b, s, p, Precision::Bf16).unwrap();
            let a = f32c.forward(&x, None, false).unwrap();
            let o = bf.forward(&x, None, false).unwrap();
            let err = (&a - &o).unwrap().abs().unwrap().max_all().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap();
            let rel = err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
            assert!(
                rel < 1e-2,
                "k{k} s{s} {cin}->{cout} {h}x{w}: bf16 rel err {rel}"
            );
        }
    }

    #[test]
    fn max_pool_matches_padded_candle_pool() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 12), &Device::Cpu).unwrap();
        let reference = x
            .pad_with_same(3, 1, 1)
            .unwrap()
            .pad_with_same(2, 1, 1)
            .unwrap()
            .max_pool2d_with_stride(3, 2)
            .unwrap();
        let ours = max_pool_3x3_s2_p1(&x).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        let d = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn winograd_matches_direct() {
        let dev = Device::Cpu;
        for (h, w) in [(12, 17), (13, 16), (15, 11), (17, 9)] {
            let x = Tensor::randn(0f32, 1.0, (1, 128, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.05, (48, 128, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
            let direct = FusedConv2d::with_winograd(&wt, &b, 1, 1, false).unwrap();
            assert!(direct.winograd.is_none());
            let d = direct.forward(&x, None, false).unwrap();
            let scale = d.abs().unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap();
            for (spec, bound) in [(&F2, 2e-6), (&F4, 2e-5)] {
                let wino =
                    FusedConv2d::with_spec(&wt, &b, 1, 1, Some(spec), Precision::F32).unwrap();
                assert!(wino.winograd.is_some());
                let a = wino.forward(&x, None, false).unwrap();
                let err = (&a - &d).unwrap().abs().unwrap().max_all().unwrap();
                let rel = err.to_scalar::<f32>().unwrap() / scale;
                assert!(rel < bound, "F({}) {h}×{w}: rel err {rel}", spec.t - 2);
            }
        }
    }
}

#[cfg(test)]
mod channels_last_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn channels_last_matches_permute_forward_and_backward() {
        let dev = Device::Cpu;
        for (n, c, h, w) in [(2, 5, 3, 7), (1, 819, 9, 13), (3, 36, 1, 1), (2, 7, 64, 3)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap()).unwrap();
            let ours = channels_last(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            // A weighting that makes every position's gradient distinct.
            let r = Tensor::randn(0f32, 1.0, (n, h, w, c), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let a = g1.get(x.as_tensor()).unwrap();
            let b = g2.get(x.as_tensor()).unwrap();
            assert_eq!(a.dims(), &[n, c, h, w]);
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}
