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
//! - stride > 1: im2col over a band of output rows at a time, then one product per band.
//!
//! The bias (folded batch norm), an optional residual and the ReLU are fused: the output is
//! initialised with bias + residual, the products accumulate into it, and the ReLU is applied
//! while the result is compacted. Other devices, other dtypes and training use Candle's ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Module, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// A convolution with folded bias, ready for the fast CPU path.
#[derive(Debug, Clone)]
pub struct FusedConv2d {
    /// Stride 1: weights per tap, `[k·k][cout][cin]`; otherwise im2col order,
    /// `[cout][cin·k·k]`.
    packed: Vec<f32>,
    /// Winograd F(2×2, 3×3) weights `G·g·Gᵀ`, `[16][cout][cin]`, for 3×3 stride-1 convs.
    winograd: Option<Vec<f32>>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl FusedConv2d {
    /// Prepares `weight` `(cout, cin, k, k)` and `bias` `(cout,)`; 3×3 stride-1 convolutions
    /// with padding 1 and at least 128 input channels use Winograd's F(2×2, 3×3), which needs
    /// 2.25× fewer multiplications.
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
        tune_allocator();
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            candle_core::bail!("unsupported conv: kernel {k}×{k2}, stride {stride}");
        }
        let w = weight.to_dtype(DType::F32)?;
        let packed = if stride == 1 {
            w.permute((2, 3, 0, 1))?.contiguous()?
        } else {
            w.clone()
        };
        // Below ~128 input channels the transforms cost more than the products save.
        let eligible = winograd && k == 3 && stride == 1 && padding == 1 && cin >= 128;
        let winograd = if eligible {
            Some(winograd_weights(&w.flatten_all()?.to_vec1()?, cout, cin))
        } else {
            None
        };
        Ok(Self {
            winograd,
            packed: packed.flatten_all()?.to_vec1()?,
            bias: bias.to_dtype(DType::F32)?.to_vec1()?,
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
        if let Some(u) = &self.winograd {
            self.run_winograd(u, x, h, w, &epilogue);
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
                        self.product(dst, nb, t > 0, tap, self.cin, &input[offset..], hp * wp)
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
                unsafe { self.product(dst, nb, false, &self.packed, kk, cols, nb) };
                epilogue.write(dst, nb, |j| Some(q0 + j));
            });
        }
    }

    /// Winograd F(2×2, 3×3): per 4×4 input tile, V = Bᵀ·d·B; per tile position ξ of 16,
    /// M_ξ = U_ξ · V_ξ (a matrix product over channels); per output tile, Y = Aᵀ·M·A.
    fn run_winograd(&self, u: &[f32], x: &[f32], h: usize, w: usize, epilogue: &Epilogue) {
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        // Padded by 1, plus one more row/column when a side is odd.
        let (hp, wp) = (2 * th + 2, 2 * tw + 2);
        let padded = pad_to(x, self.cin, h, w, 1, hp, wp);
        let tiles = th * tw;
        let (cin, cout) = (self.cin, self.cout);
        let nt = (WINOGRAD_BAND_FLOATS / (16 * (cin + cout))).clamp(16, 1024);
        let bands = tiles.div_ceil(nt);
        (0..bands).into_par_iter().for_each_init(
            || (vec![0f32; 16 * cin * nt], vec![0f32; 16 * cout * nt]),
            |(v, m), b| {
                let t0 = b * nt;
                let n = nt.min(tiles - t0);
                winograd_input(&padded, cin, hp, wp, tw, t0, n, &mut v[..16 * cin * n]);
                for xi in 0..16 {
                    let lhs = &u[xi * cout * cin..][..cout * cin];
                    let rhs = &v[xi * cin * n..][..cin * n];
                    let dst = &mut m[xi * cout * n..][..cout * n];
                    // SAFETY: lhs is cout × cin, rhs cin × n, dst cout × n.
                    unsafe { self.product(dst, n, false, lhs, cin, rhs, n) };
                }
                epilogue.write_winograd(&m[..16 * cout * n], cout, n, t0, tw, h, w);
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
        lhs: &[f32],
        kdim: usize,
        rhs: &[f32],
        rhs_rs: usize,
    ) {
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

/// Floats of Winograd scratch (transformed inputs and products) per band: about 2 MB.
const WINOGRAD_BAND_FLOATS: usize = 512 * 1024;

/// U = G·g·Gᵀ for every (cout, cin) 3×3 kernel, laid out `[16][cout][cin]`.
fn winograd_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mut u = vec![0f32; 16 * cout * cin];
    for (oc, g) in w.chunks_exact(9).enumerate() {
        let g = |r: usize, c: usize| g[r * 3 + c] as f64;
        for i in 0..4 {
            for j in 0..4 {
                let mut acc = 0.0;
                for (r, gi) in G[i].iter().enumerate() {
                    for (c, gj) in G[j].iter().enumerate() {
                        acc += gi * g(r, c) * gj;
                    }
                }
                u[(i * 4 + j) * cout * cin + oc] = acc as f32;
            }
        }
    }
    u
}

/// V = Bᵀ·d·B for `n` tiles from `t0` of every channel, into `v` laid out `[16][cin][n]`.
#[allow(clippy::too_many_arguments)]
fn winograd_input(
    x: &[f32],
    cin: usize,
    hp: usize,
    wp: usize,
    tw: usize,
    t0: usize,
    n: usize,
    v: &mut [f32],
) {
    for c in 0..cin {
        let plane = &x[c * hp * wp..][..hp * wp];
        for j in 0..n {
            let (ty, tx) = ((t0 + j) / tw, (t0 + j) % tw);
            let base = 2 * ty * wp + 2 * tx;
            let row = |r: usize| {
                let s = &plane[base + r * wp..][..4];
                [s[0], s[1], s[2], s[3]]
            };
            let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
            // Bᵀ·d: rows d0 − d2, d1 + d2, d2 − d1, d1 − d3.
            let rows = [sub(d0, d2), add(d1, d2), sub(d2, d1), sub(d1, d3)];
            for (i, r) in rows.iter().enumerate() {
                // (·)·B: columns r0 − r2, r1 + r2, r2 − r1, r1 − r3.
                let out = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]];
                for (jj, &val) in out.iter().enumerate() {
                    v[((i * 4 + jj) * cin + c) * n + j] = val;
                }
            }
        }
    }
}

fn add(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
}

fn sub(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]]
}

/// A pointer shared by bands that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: bands write disjoint output elements (each output position belongs to one band).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

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
    #[allow(clippy::too_many_arguments)]
    fn write_winograd(
        &self,
        m: &[f32],
        cout: usize,
        n: usize,
        t0: usize,
        tw: usize,
        h: usize,
        w: usize,
    ) {
        for (co, &b) in self.bias.iter().enumerate().take(cout) {
            for j in 0..n {
                let at = |xi: usize| m[(xi * cout + co) * n + j];
                let row = |i: usize| [at(4 * i), at(4 * i + 1), at(4 * i + 2), at(4 * i + 3)];
                let (m0, m1, m2, m3) = (row(0), row(1), row(2), row(3));
                // Aᵀ·M: rows m0 + m1 + m2 and m1 − m2 − m3; then ·A on the columns.
                let s0 = add(add(m0, m1), m2);
                let s1 = sub(sub(m1, m2), m3);
                let (ty, tx) = ((t0 + j) / tw, (t0 + j) % tw);
                for (i, s) in [s0, s1].iter().enumerate() {
                    let y = 2 * ty + i;
                    if y >= h {
                        continue;
                    }
                    for (jj, val) in [s[0] + s[1] + s[2], s[1] - s[2] - s[3]]
                        .into_iter()
                        .enumerate()
                    {
                        let xx = 2 * tx + jj;
                        if xx >= w {
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

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
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

/// A differentiable convolution without bias, `x (n, cin, h, w) ⋆ w (cout, cin, k, k)`, that
/// runs the fast CPU kernels forward and backward (f32 on the CPU; elsewhere Candle's
/// `conv2d`). Candle computes the input gradient with a direct transposed-convolution loop
/// and the weight gradient with a generic convolution; here the input gradient is a stride-1
/// convolution of the (dilated) output gradient with the flipped kernel, and the weight
/// gradient a matrix product of the output gradient with im2col bands of the input.
pub fn conv2d_train(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, k, k2) = w.dims4()?;
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !cpu_f32 || k != k2 || padding >= k.max(1) && padding > 0 && padding > k - 1 {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let g = Geometry { k, stride, padding };
    x.contiguous()?.apply_op2(&w.contiguous()?, TrainConv(g))
}

struct TrainConv(Geometry);

/// A fused convolution (zero bias) from a host weight slice `(cout, cin, k, k)`.
fn fused_from(
    w: &[f32],
    dims: (usize, usize, usize),
    stride: usize,
    padding: usize,
) -> Result<FusedConv2d> {
    let (cout, cin, k) = dims;
    let dev = candle_core::Device::Cpu;
    let wt = Tensor::from_slice(w, (cout, cin, k, k), &dev)?;
    let b = Tensor::zeros(cout, DType::F32, &dev)?;
    // No Winograd in training: its transforms lose a little precision in long gradient sums.
    FusedConv2d::with_winograd(&wt, &b, stride, padding, false)
}

impl CustomOp2 for TrainConv {
    fn name(&self) -> &'static str {
        "fast-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, wcin, k, _) = wl.shape().dims4()?;
        if cin != wcin || h + 2 * self.0.padding < k || w + 2 * self.0.padding < k {
            candle_core::bail!(
                "conv: input {:?} does not fit weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let conv = fused_from(
            f32_slice(ws, wl)?,
            (cout, cin, k),
            self.0.stride,
            self.0.padding,
        )?;
        let (ho, wo) = self.0.output_size(h, w);
        let out = conv.run_batch(f32_slice(xs, xl)?, n, h, w);
        Ok((CpuStorage::F32(out), Shape::from((n, cout, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.to_vec1_flat()?;
        let xv = x.contiguous()?.to_vec1_flat()?;
        let wv = w.contiguous()?.to_vec1_flat()?;
        let (n, cin, h, wd) = x.dims4()?;
        let (cout, _, k, _) = w.dims4()?;
        let (ho, wo) = self.0.output_size(h, wd);
        let dev = x.device();
        let gx = grad_input(&g, &wv, self.0, (n, cin, cout, h, wd, ho, wo))?;
        let gw = grad_weight(&g, &xv, self.0, (n, cin, cout, h, wd, ho, wo));
        Ok((
            Some(Tensor::from_vec(gx, (n, cin, h, wd), dev)?),
            Some(Tensor::from_vec(gw, (cout, cin, k, k), dev)?),
        ))
    }
}

trait FlatVec {
    fn to_vec1_flat(&self) -> Result<Vec<f32>>;
}

impl FlatVec for Tensor {
    fn to_vec1_flat(&self) -> Result<Vec<f32>> {
        self.flatten_all()?.to_vec1()
    }
}

/// (n, cin, cout, h, w, ho, wo).
type ConvDims = (usize, usize, usize, usize, usize, usize, usize);

/// ∂L/∂x: the output gradient, dilated by the stride, convolved (stride 1, padding
/// k − 1 − p) with the kernel flipped in space and transposed in channels.
fn grad_input(g: &[f32], w: &[f32], geo: Geometry, d: ConvDims) -> Result<Vec<f32>> {
    let (n, cin, cout, h, wd, ho, wo) = d;
    let (k, s, p) = (geo.k, geo.stride, geo.padding);
    let mut flipped = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..k * k {
                flipped[(ci * cout + co) * k * k + (k * k - 1 - t)] =
                    w[(co * cin + ci) * k * k + t];
            }
        }
    }
    // Dilated size: the output positions at multiples of the stride, plus the rows and
    // columns the forward pass never reached.
    let hd = h + 2 * p + 1 - k;
    let wdd = wd + 2 * p + 1 - k;
    let dilated;
    let gd = if s == 1 {
        g
    } else {
        let mut v = vec![0f32; n * cout * hd * wdd];
        for (plane, src) in v.chunks_exact_mut(hd * wdd).zip(g.chunks_exact(ho * wo)) {
            for oy in 0..ho {
                for ox in 0..wo {
                    plane[oy * s * wdd + ox * s] = src[oy * wo + ox];
                }
            }
        }
        dilated = v;
        &dilated
    };
    let conv = fused_from(&flipped, (cin, cout, k), 1, k - 1 - p)?;
    Ok(conv.run_batch(gd, n, hd, wdd))
}

/// ∂L/∂w = Σ over images and positions of the output gradient times the im2col columns.
fn grad_weight(g: &[f32], x: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
    let (n, cin, cout, h, w, ho, wo) = d;
    let kk = cin * geo.k * geo.k;
    let q = ho * wo;
    let nb = (BAND_FLOATS / (cout + kk)).clamp(64, 2048);
    let bands = q.div_ceil(nb);
    let jobs = n * bands;
    // A fixed split of the work, summed in order: the result does not depend on the thread
    // count or on scheduling, so training runs (and resumes) are reproducible.
    let chunks = jobs.min(GRAD_CHUNKS);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cout * kk];
            let mut cols = vec![0f32; kk * nb];
            for job in c * jobs / chunks..(c + 1) * jobs / chunks {
                let (img, b) = (job / bands, job % bands);
                let q0 = b * nb;
                let len = nb.min(q - q0);
                let band = &mut cols[..kk * len];
                im2col(
                    &geo,
                    &x[img * cin * h * w..][..cin * h * w],
                    h,
                    w,
                    q0,
                    len,
                    band,
                );
                let lhs = &g[img * cout * q + q0..];
                // SAFETY: acc is cout × kk; lhs rows are q apart with len values from q0;
                // band is kk × len, read transposed.
                unsafe {
                    gemm(
                        cout,
                        kk,
                        len,
                        acc.as_mut_ptr(),
                        1,
                        kk as isize,
                        true,
                        lhs.as_ptr(),
                        1,
                        q as isize,
                        band.as_ptr(),
                        len as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; cout * kk];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Pieces the weight gradient is split into (then summed in order).
const GRAD_CHUNKS: usize = 8;

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
            Conv::Plain(c) => add_relu(plain_forward(c, x)?, residual, relu),
        }
    }

    /// Replaces a plain convolution by its fused form (weights scaled per output channel by
    /// `scale` and shifted by `shift`, i.e. a folded batch norm, when given).
    pub fn fuse(&mut self, scale_shift: Option<(&Tensor, &Tensor)>) -> Result<()> {
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
        *self = Conv::Fused(FusedConv2d::new(&weight, &bias, cfg.stride, cfg.padding)?);
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

/// A differentiable convolution: on f32 CPU tensors the fast kernels of [`conv2d_train`];
/// elsewhere Candle's convolution, made safe to differentiate. Candle 0.11's conv2d backward
/// takes the output padding of its transposed convolution from the height alone, so a strided
/// convolution whose height and width leave different remainders (P6/P7 on, say, a 25 × 34
/// P5) fails in backward. With a variable weight such a convolution runs at stride 1 and
/// keeps every `stride`-th row and column: the same values, with a backward that works.
fn plain_forward(c: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    let cfg = c.config();
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    if cpu_f32 && cfg.dilation == 1 && cfg.groups == 1 {
        let y = conv2d_train(x, c.weight(), cfg.stride, cfg.padding)?;
        return match c.bias() {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let s = cfg.stride;
    let (_, _, h, w) = x.dims4()?;
    let k = c.weight().dim(2)?;
    let span = |i: usize| (i + 2 * cfg.padding).checked_sub(cfg.dilation * (k - 1) + 1);
    let (Some(sh), Some(sw)) = (span(h), span(w)) else {
        return c.forward(x);
    };
    if s == 1 || !c.weight().is_variable() || sh % s == sw % s {
        return c.forward(x);
    }
    let dense = candle_nn::Conv2d::new(
        c.weight().clone(),
        c.bias().cloned(),
        candle_nn::Conv2dConfig { stride: 1, ..*cfg },
    );
    let y = dense.forward(x)?;
    let pick = |n: usize| Tensor::arange_step(0u32, n as u32, s as u32, x.device());
    y.index_select(&pick(sh + 1)?, 2)?
        .index_select(&pick(sw + 1)?, 3)
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
    }

    #[test]
    fn train_conv_gradients_match_candle() {
        let dev = Device::Cpu;
        for (cin, cout, k, s, p, h, w) in [
            (4, 6, 3, 1, 1, 7, 9),
            (4, 6, 3, 2, 1, 7, 10),
            (3, 5, 7, 2, 3, 13, 11),
            (6, 4, 1, 2, 0, 9, 8),
            (130, 8, 3, 1, 1, 6, 5),
        ] {
            let x = candle_core::Var::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let wt = candle_core::Var::randn(0f32, 0.2, (cout, cin, k, k), &dev).unwrap();
            let ours = conv2d_train(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            // Reference: Candle at stride 1, subsampled (Candle's own strided backward fails
            // when height and width leave different remainders).
            let dense = x.as_tensor().conv2d(wt.as_tensor(), p, 1, 1, 1).unwrap();
            let (_, _, dh, dw) = dense.dims4().unwrap();
            let pick = |n: usize| Tensor::arange_step(0u32, n as u32, s as u32, &dev).unwrap();
            let theirs = dense
                .index_select(&pick(dh), 2)
                .unwrap()
                .index_select(&pick(dw), 3)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            // A loss with position-dependent weights, so gradients are not uniform.
            let m = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let lo = (ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
            let lt = (theirs * &m)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let a = lo.get(v.as_tensor()).unwrap();
                let b = lt.get(v.as_tensor()).unwrap();
                let b_abs_max = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let err = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let err = err.to_scalar::<f32>().unwrap();
                let rel = err / b_abs_max;
                assert!(
                    rel < 1e-5,
                    "k{k} s{s} {cin}->{cout} {h}x{w}: grad rel err {rel}"
                );
            }
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
        for (h, w) in [(12, 17), (13, 16), (7, 10), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (1, 128, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.05, (48, 128, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
            let wino = FusedConv2d::with_winograd(&wt, &b, 1, 1, true).unwrap();
            let direct = FusedConv2d::with_winograd(&wt, &b, 1, 1, false).unwrap();
            assert!(wino.winograd.is_some() && direct.winograd.is_none());
            let a = wino.forward(&x, None, false).unwrap();
            let d = direct.forward(&x, None, false).unwrap();
            let err = (&a - &d).unwrap().abs().unwrap().max_all().unwrap();
            let scale = d
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rel = err.to_scalar::<f32>().unwrap() / scale;
            assert!(rel < 2e-6, "{h}×{w}: rel err {rel}");
        }
    }
}
