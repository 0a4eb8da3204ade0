//! Differentiable convolutions for training, on the fast CPU kernels.
//!
//! One op computes `relu?(conv(x, w) + bias [+ residual])`. Backward, it masks the output
//! gradient by the ReLU once and derives every input's gradient from that: the input gradient
//! as a convolution of it with the flipped kernel (stride 1) or as a matrix product scattered
//! back by col2im (stride > 1), the weight gradient as products with im2col bands of the
//! input, the bias gradient as per-channel sums, the residual's as the masked gradient itself.
//! Against Candle's ops (convolution, norm, sum, ReLU as separate nodes) this keeps one saved
//! tensor per convolution instead of four and skips three full passes each way; gradients of
//! inputs that need none (the output of a frozen stage) are not computed.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

use super::{bt, im2col, Algorithm, FusedConv2d, Geometry, BAND_FLOATS};

/// The bias of a training convolution.
#[derive(Debug, Clone, Copy)]
pub enum TrainBias<'a> {
    /// No bias.
    None,
    /// A per-channel constant, e.g. a frozen batch norm's shift; it gets no gradient.
    Constant(&'a Tensor),
    /// A bias `(cout,)` that gets a gradient when it is a variable.
    Learned(&'a Tensor),
    /// A frozen batch norm folded in: the kernel scaled per output channel by the constant
    /// `scale` and the constant `shift` added, as `conv(x, w · scale) + shift`. The weight's
    /// gradient is the folded kernel's times `scale`, as Candle's `broadcast_mul` gives it,
    /// but without a separate scaled copy and its backward pass every step.
    FrozenNorm {
        /// Per-output-channel scale, `cout` values in any shape.
        scale: &'a Tensor,
        /// Per-output-channel shift, `cout` values in any shape.
        shift: &'a Tensor,
    },
}

/// The algorithm of the stride-1 3×3 forward products in training (and of frozen layers).
/// Direct products: Winograd's rounding in the forward activations, amplified through the
/// backward pass, moved deep float32 gradients 3e-3 from float64 (torchvision: 1e-6) and the
/// v2 parity loss after three SGD steps 1.5e-3 from torchvision's. With gemm's AVX-512
/// kernels the direct products cost only ~5 % more per step.
pub(super) const TRAIN_ALGORITHM: Algorithm = Algorithm::Gemm;

/// The algorithm of the stride-1 input gradients (the flipped-kernel convolution): its
/// rounding only adds to the gradients, so F(2×2, 3×3) keeps them as close to float64 as
/// direct products (1.1e-6 on the FPN weights) and makes the R50 step ~7 % faster; F(4×4)
/// was no faster overall and held 140 MB more of transformed kernels.
pub(super) const GRAD_INPUT_ALGORITHM: Algorithm = Algorithm::Winograd2;

/// A differentiable convolution without bias, `x (n, cin, h, w) ⋆ w (cout, cin, k, k)`.
pub fn conv2d_train(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_train_fused(x, w, stride, padding, TrainBias::None, None, false)
}

/// `relu?(conv(x, w) + bias [+ residual])`, differentiable in `x`, `w`, a learned bias and the
/// residual. f32 CPU tensors run the fast kernels; anything else runs Candle's ops.
pub fn conv2d_train_fused(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    bias: TrainBias,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    if let (TrainBias::Learned(b), Some(r)) = (bias, residual) {
        // Both: the bias joins the residual, whose gradient it then shares, summed.
        let r = r.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        return conv2d_train_fused(x, w, stride, padding, TrainBias::None, Some(&r), relu);
    }
    match TrainConv2d::new(w, bias, stride, padding)? {
        Some(conv) if x.device().is_cpu() && x.dtype() == DType::F32 => {
            conv.forward(x, residual, relu)
        }
        _ => candle_conv(x, w, stride, padding, bias, residual, relu),
    }
}

/// A training convolution with its kernels packed (and Winograd-transformed) once, to run on
/// several inputs in one step: the head applies the same weights to five feature maps.
/// Build it again after the weights change.
pub struct TrainConv2d {
    weight: Tensor,
    /// The kernel with a frozen norm's scale folded in, and that scale.
    folded: Option<(Vec<f32>, Vec<f32>)>,
    /// A learned bias, passed to the op so that it receives a gradient.
    learned_bias: Option<Tensor>,
    geo: Geometry,
    forward: FusedConv2d,
    /// The flipped kernel of the input gradient (stride 1), built on first use.
    flipped: OnceLock<FusedConv2d>,
}

impl std::fmt::Debug for TrainConv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainConv2d")
            .field("weight", &self.weight.shape())
            .field("geometry", &self.geo)
            .finish()
    }
}

impl TrainConv2d {
    /// Packs `weight` `(cout, cin, k, k)` and `bias`; `None` where the fast kernels do not
    /// apply (not f32 on the CPU, a non-square kernel, padding ≥ kernel). The forward
    /// multiplies directly (see [`Self::with_algorithm`]).
    pub fn new(
        weight: &Tensor,
        bias: TrainBias,
        stride: usize,
        padding: usize,
    ) -> Result<Option<Arc<Self>>> {
        Self::with_algorithm(weight, bias, stride, padding, TRAIN_ALGORITHM)
    }

    /// [`Self::new`] with the algorithm of the forward's stride-1 3×3 products. Winograd's
    /// rounding there reaches the activations, and through them every gradient below, so
    /// it is chosen per layer (as [`crate::model::head`] does). Measured with F(2×2, 3×3) in train
    /// parity: in the v1 head, float32 gradients stayed as close to float64 as with direct
    /// products (1.1e-6). Everywhere, they moved 40× further (4.7e-5): backbone kernels
    /// carry folded frozen batch-norm scales and cancel against large shifts. In v2's FPN
    /// and output convolutions, before GroupNorm, they moved 8× further.
    pub fn with_algorithm(
        weight: &Tensor,
        bias: TrainBias,
        stride: usize,
        padding: usize,
        algorithm: Algorithm,
    ) -> Result<Option<Arc<Self>>> {
        let (cout, cin, k, k2) = weight.dims4()?;
        let fits = weight.device().is_cpu() && weight.dtype() == DType::F32;
        if !fits || k != k2 || padding >= k || stride == 0 {
            return Ok(None);
        }
        let geo = Geometry { k, stride, padding };
        let weight = weight.contiguous()?;
        let folded = match bias {
            TrainBias::FrozenNorm { scale, .. } => {
                let scale = channel_values(scale, cout)?;
                let w = with_host(&weight, |w| scale_rows(w, &scale))?;
                Some((w, scale))
            }
            _ => None,
        };
        let pack = |w: &[f32]| {
            let bias = constant(bias, cout)?;
            fused(w, (cout, cin, k), bias, geo, algorithm)
        };
        let forward = match &folded {
            Some((w, _)) => pack(w)?,
            None => with_host(&weight, pack)??,
        };
        let learned_bias = match bias {
            TrainBias::Learned(b) => Some(b.contiguous()?),
            _ => None,
        };
        Ok(Some(Arc::new(Self {
            weight,
            folded,
            learned_bias,
            geo,
            forward,
            flipped: OnceLock::new(),
        })))
    }

    /// `relu?(conv(x) + bias [+ residual])` for an f32 CPU `x`. A residual cannot be combined
    /// with a learned bias here (see [`conv2d_train_fused`]).
    pub fn forward(
        self: &Arc<Self>,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("the fast training conv runs on f32 CPU tensors only");
        }
        let x = x.contiguous()?;
        let op = |extra| TrainConv {
            conv: self.clone(),
            relu,
            extra,
        };
        match (&self.learned_bias, residual) {
            (Some(_), Some(_)) => {
                candle_core::bail!("a learned bias and a residual: use conv2d_train_fused")
            }
            (Some(b), None) => x.apply_op3(&self.weight, b, op(Extra::Bias)),
            (None, Some(r)) => x.apply_op3(&self.weight, &r.contiguous()?, op(Extra::Residual)),
            (None, None) => x.apply_op2(&self.weight, op(Extra::None)),
        }
    }

    /// The stride-1 convolution computing the input gradient.
    fn flipped(&self) -> Result<&FusedConv2d> {
        if let Some(c) = self.flipped.get() {
            return Ok(c);
        }
        let (cout, cin, k, _) = self.weight.dims4()?;
        let kk = k * k;
        let mut flipped = vec![0f32; cout * cin * kk];
        self.with_kernel(|w| {
            flipped
                .par_chunks_mut(cout * kk)
                .enumerate()
                .for_each(|(ci, dst)| {
                    for co in 0..cout {
                        for t in 0..kk {
                            dst[co * kk + (kk - 1 - t)] = w[(co * cin + ci) * kk + t];
                        }
                    }
                })
        })?;
        let geo = Geometry {
            k,
            stride: 1,
            padding: k - 1 - self.geo.padding,
        };
        let conv = fused(
            &flipped,
            (cin, cout, k),
            vec![0.0; cin],
            geo,
            GRAD_INPUT_ALGORITHM,
        )?;
        Ok(self.flipped.get_or_init(|| conv))
    }

    /// Runs `f` on the kernel the forward uses (a frozen norm's scale folded in).
    fn with_kernel<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        match &self.folded {
            Some((w, _)) => Ok(f(w)),
            None => with_host(&self.weight, f),
        }
    }
}

/// `cout` per-channel values of a tensor of any shape.
fn channel_values(t: &Tensor, cout: usize) -> Result<Vec<f32>> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if v.len() != cout {
        candle_core::bail!(
            "conv bias or scale has {} values for {cout} channels",
            v.len()
        );
    }
    Ok(v)
}

/// Rows of a `(cout, …)` array times a per-row factor.
fn scale_rows(w: &[f32], scale: &[f32]) -> Vec<f32> {
    let mut out = w.to_vec();
    scale_rows_in_place(&mut out, scale);
    out
}

fn scale_rows_in_place(w: &mut [f32], scale: &[f32]) {
    let row = w.len() / scale.len();
    w.par_chunks_mut(row)
        .zip(scale.par_iter())
        .for_each(|(r, &s)| r.iter_mut().for_each(|v| *v *= s));
}

/// The values of a bias (zeros when absent).
fn constant(bias: TrainBias, cout: usize) -> Result<Vec<f32>> {
    match bias {
        TrainBias::None => Ok(vec![0.0; cout]),
        TrainBias::Constant(b) | TrainBias::Learned(b) | TrainBias::FrozenNorm { shift: b, .. } => {
            channel_values(b, cout)
        }
    }
}

/// Candle's ops, made safe to differentiate: Candle 0.11's conv2d backward takes the output
/// padding of its transposed convolution from the height alone, so a strided convolution
/// whose height and width leave different remainders (P6/P7 on, say, a 25 × 34 P5) fails in
/// backward. A tracked weight then runs at stride 1 and keeps every `stride`-th row and
/// column: the same values, with a backward that works.
fn candle_conv(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    bias: TrainBias,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let (w, bias) = match bias {
        TrainBias::FrozenNorm { scale, shift } => (
            w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?,
            TrainBias::Constant(shift),
        ),
        _ => (w.clone(), bias),
    };
    let span = |i: usize| (i + 2 * padding).checked_sub(k);
    let y = match (span(h), span(wd)) {
        (Some(sh), Some(sw)) if stride > 1 && w.track_op() && sh % stride != sw % stride => {
            let dense = x.conv2d(&w, padding, 1, 1, 1)?;
            let pick = |n: usize| Tensor::arange_step(0u32, n as u32, stride as u32, x.device());
            dense
                .index_select(&pick(sh + 1)?, 2)?
                .index_select(&pick(sw + 1)?, 3)?
        }
        _ => x.conv2d(&w, padding, stride, 1, 1)?,
    };
    let y = match bias {
        TrainBias::None => y,
        TrainBias::Constant(b) | TrainBias::Learned(b) | TrainBias::FrozenNorm { shift: b, .. } => {
            y.broadcast_add(&b.reshape((1, (), 1, 1))?)?
        }
    };
    super::add_relu(y, residual, relu)
}

/// What the op's third argument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    None,
    Bias,
    Residual,
}

struct TrainConv {
    conv: Arc<TrainConv2d>,
    relu: bool,
    extra: Extra,
}

/// `(n, cin, cout, h, w, ho, wo)`.
type ConvDims = (usize, usize, usize, usize, usize, usize, usize);

impl TrainConv {
    fn forward(
        &self,
        x: (&[f32], &Layout),
        w: &Layout,
        extra: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, wd) = x.1.shape().dims4()?;
        let (cout, wcin, k, _) = w.shape().dims4()?;
        let p = self.conv.geo.padding;
        if cin != wcin || h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!(
                "conv: input {:?} does not fit weight {:?}",
                x.1.shape(),
                w.shape()
            );
        }
        let (ho, wo) = self.conv.geo.output_size(h, wd);
        let out_len = cout * ho * wo;
        let mut out = match (self.extra, extra) {
            (Extra::Residual, Some(r)) if r.len() == n * out_len => r.to_vec(),
            (Extra::Residual, _) => {
                candle_core::bail!("conv residual does not have {} values", n * out_len)
            }
            _ => vec![0f32; n * out_len],
        };
        for (i, o) in out.chunks_exact_mut(out_len).enumerate() {
            let xi = &x.0[i * cin * h * wd..][..cin * h * wd];
            self.conv.forward.run(xi, h, wd, o, self.relu);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, ho, wo))))
    }

    /// Gradients of `x`, `w` and the third argument (each only where it is tracked).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        extra: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let mut g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        if self.relu {
            // The ReLU passed gradient where its output is positive.
            with_host(res, |r| {
                g.par_iter_mut().zip(r.par_iter()).for_each(|(g, &r)| {
                    if r <= 0.0 {
                        *g = 0.0
                    }
                })
            })?;
        }
        let (n, cin, h, wd) = x.dims4()?;
        let (cout, _, k, _) = w.dims4()?;
        let geo = self.conv.geo;
        let (ho, wo) = geo.output_size(h, wd);
        let dims = (n, cin, cout, h, wd, ho, wo);
        let dev = x.device();
        let gx = if !x.track_op() {
            None
        } else if geo.stride == 1 {
            let (hd, wdd) = (h + 2 * geo.padding + 1 - k, wd + 2 * geo.padding + 1 - k);
            let gx = self.conv.flipped()?.run_batch(&g, n, hd, wdd);
            Some(Tensor::from_vec(gx, (n, cin, h, wd), dev)?)
        } else {
            let gx = self
                .conv
                .with_kernel(|wv| grad_input_strided(&g, wv, geo, dims))?;
            Some(Tensor::from_vec(gx, (n, cin, h, wd), dev)?)
        };
        let gw = if w.track_op() {
            let mut gw = with_host(x, |xv| grad_weight(&g, xv, geo, dims))?;
            if let Some((_, scale)) = &self.conv.folded {
                scale_rows_in_place(&mut gw, scale);
            }
            Some(Tensor::from_vec(gw, (cout, cin, k, k), dev)?)
        } else {
            None
        };
        let ge = match (self.extra, extra) {
            (Extra::Bias, Some(b)) if b.track_op() => Some(Tensor::from_vec(
                channel_sums(&g, cout, ho * wo),
                cout,
                dev,
            )?),
            (Extra::Residual, Some(r)) if r.track_op() => {
                Some(Tensor::from_vec(g, (n, cout, ho, wo), dev)?)
            }
            _ => None,
        };
        Ok([gx, gw, ge])
    }
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
        let _ = ws;
        self.forward((super::f32_slice(xs, xl)?, xl), wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, _] = self.backward(x, w, None, res, grad)?;
        Ok((gx, gw))
    }
}

impl CustomOp3 for TrainConv {
    fn name(&self) -> &'static str {
        "fast-conv2d-fused"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        es: &CpuStorage,
        el: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let extra = super::f32_slice(es, el)?;
        let _ = ws;
        self.forward((super::f32_slice(xs, xl)?, xl), wl, Some(extra))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        e: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, ge] = self.backward(x, w, Some(e), res, grad)?;
        Ok((gx, gw, ge))
    }
}

/// Runs `f` on the values of an f32 CPU tensor without copying them.
fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    match super::host_f32(&t.contiguous()?, f) {
        Some(r) => Ok(r),
        None => candle_core::bail!("training conv: expected an f32 CPU tensor"),
    }
}

/// A fused convolution from a host weight slice `(cout, cin, k, k)`.
fn fused(
    w: &[f32],
    dims: (usize, usize, usize),
    bias: Vec<f32>,
    geo: Geometry,
    algorithm: Algorithm,
) -> Result<FusedConv2d> {
    FusedConv2d::from_host(
        w,
        bias,
        dims,
        (geo.stride, geo.padding),
        algorithm.spec(),
        super::Precision::F32,
    )
}

/// Per-channel sums of an `(n, c, plane)` gradient, accumulated in f64, channels in
/// parallel (each summed in a fixed order).
fn channel_sums(g: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let n = g.len() / (c * plane);
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let image = |i: usize| &g[(i * c + ch) * plane..][..plane];
            let sum: f64 = (0..n)
                .map(|i| image(i).iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            sum as f32
        })
        .collect()
}

/// ∂L/∂x of a strided convolution: per image, the columns `wᵀ · g` (one product) scattered
/// back onto the input positions they were read from. (Stride 1 is the convolution of the
/// output gradient with the flipped kernel, [`TrainConv2d::flipped`].)
fn grad_input_strided(g: &[f32], w: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
    let (n, cin, cout, h, wd, ho, wo) = d;
    let (k, s, p) = (geo.k, geo.stride, geo.padding);
    let (kk, q) = (cin * k * k, ho * wo);
    let mut gx = vec![0f32; n * cin * h * wd];
    let mut cols = vec![0f32; kk * q];
    for (img, gx_img) in gx.chunks_exact_mut(cin * h * wd).enumerate() {
        let g_img = &g[img * cout * q..][..cout * q];
        // SAFETY: cols is kk × q (row stride q); w is cout × kk, read transposed; g_img is
        // cout × q.
        unsafe {
            gemm(
                kk,
                q,
                cout,
                cols.as_mut_ptr(),
                1,
                q as isize,
                false,
                w.as_ptr(),
                kk as isize,
                1,
                g_img.as_ptr(),
                1,
                q as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        // col2im: each input channel only receives its own k·k rows, so channels run in
        // parallel without sharing writes.
        gx_img
            .par_chunks_exact_mut(h * wd)
            .zip(cols.par_chunks_exact(k * k * q))
            .for_each(|(plane, rows)| {
                for (t, row) in rows.chunks_exact(q).enumerate() {
                    let (ky, kx) = (t / k, t % k);
                    for oy in 0..ho {
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < h) else {
                            continue;
                        };
                        let dst = &mut plane[iy * wd..][..wd];
                        for (ox, &v) in row[oy * wo..][..wo].iter().enumerate() {
                            if let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&x| x < wd) {
                                dst[ix] += v;
                            }
                        }
                    }
                }
            });
    }
    gx
}

/// ∂L/∂w = Σ over images and positions of the output gradient times the im2col columns.
///
/// Each thread owns a block of input channels, i.e. a block of the gradient's columns, and
/// runs over every image and position with long products (k of ~1000 positions), so the
/// output is read and written a few times instead of once per band of ~100 positions. The
/// blocks are disjoint and each is summed in a fixed order: the result does not depend on
/// the thread count, so training runs (and resumes) are reproducible.
fn grad_weight(g: &[f32], x: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
    let (n, cin, cout, h, w, ho, wo) = d;
    let kt = geo.k * geo.k;
    let kk = cin * kt;
    let q = ho * wo;
    if geo.k == 3 && geo.stride == 1 && geo.padding == 1 && n * ho * wo >= MIN_WINOGRAD_GW_POSITIONS
    {
        return grad_weight_winograd(g, x, d, WINOGRAD_GW_FLOATS);
    }
    let threads = rayon::current_num_threads().max(1);
    let cb = channel_block(cin, kt, threads);
    if cin.div_ceil(cb) < 2 * threads {
        return grad_weight_by_positions(g, x, geo, d);
    }
    let pointwise = geo.k == 1 && geo.stride == 1 && geo.padding == 0;
    let mut total = vec![0f32; cout * kk];
    let out = SharedOut(total.as_mut_ptr());
    (0..cin.div_ceil(cb)).into_par_iter().for_each(|b| {
        let (c0, c1) = (b * cb, (b * cb + cb).min(cin));
        let rows = (c1 - c0) * kt;
        let nb = if pointwise {
            q
        } else {
            (BAND_FLOATS / rows).clamp(64, 4096).min(q)
        };
        let mut cols = vec![0f32; if pointwise { 0 } else { rows * nb }];
        for img in 0..n {
            let channels = &x[(img * cin + c0) * h * w..(img * cin + c1) * h * w];
            for q0 in (0..q).step_by(nb) {
                let len = nb.min(q - q0);
                let band = Band {
                    input: channels,
                    q0,
                    len,
                };
                // SAFETY: the destination is the cout × rows block at column c0·k·k of the
                // cout × kk gradient (rows kk apart), written by this thread only.
                unsafe {
                    accumulate_band(
                        &geo,
                        d,
                        band,
                        &g[img * cout * q..],
                        &mut cols,
                        out.at(c0 * kt),
                        kk,
                    )
                };
            }
        }
    });
    total
}

/// Output positions (over the batch) from which [`grad_weight_winograd`] is used: below,
/// its 16 `cout × cin` sums outweigh the multiplications it saves.
const MIN_WINOGRAD_GW_POSITIONS: usize = 512;

/// Floats of transformed tiles per [`grad_weight_winograd`] chunk (32 MB): products over a
/// few hundred tiles, without holding the whole batch's transforms.
const WINOGRAD_GW_FLOATS: usize = 8 * 1024 * 1024;

/// [`grad_weight`] of a 3×3, stride-1, padding-1 convolution by Winograd F(2×2, 3×3), with
/// 2.25× fewer multiplications. The forward of one 4×4 input tile d and one weight w is
/// `Y = Aᵀ·[(G·w·Gᵀ) ⊙ (Bᵀ·d·B)]·A`, so `∂L/∂w = Gᵀ·[Σ (A·∂Y·Aᵀ) ⊙ (Bᵀ·d·B)]·G`, summed
/// over tiles. For each of the 16 tile positions ξ that sum is one product over tiles,
/// `S_ξ = Ŷ_ξ · V_ξᵀ` (`cout × cin`). Each weight then takes one small transform.
/// The transforms only add, subtract and halve. As with the stride-1 input gradient, the
/// rounding enters the gradient only, never the activations. Each `S_ξ` sums its chunks in
/// order on one thread, so the result does not depend on the thread count.
fn grad_weight_winograd(g: &[f32], x: &[f32], d: ConvDims, budget: usize) -> Vec<f32> {
    let (n, cin, cout, h, w, _, _) = d;
    let total = n * h.div_ceil(2) * w.div_ceil(2);
    let chunk = (budget / (16 * (cin + cout))).clamp(1, total);
    let lens = [
        16 * cout * cin,
        tile_block(chunk) * cin,
        tile_block(chunk) * cout,
    ];
    WINOGRAD_SCRATCH.with(|scratch| {
        // A thread blocked in a rayon join may run another job that lands here: it gets
        // fresh buffers.
        let mut fresh = Default::default();
        let mut held = scratch.try_borrow_mut();
        let [s, v, gy] = match held.as_deref_mut() {
            Ok(bufs) => bufs,
            Err(_) => &mut fresh,
        };
        let (s, v, gy) = (grown(s, lens[0]), grown(v, lens[1]), grown(gy, lens[2]));
        transformed_sums((g, x), d, chunk, (s, v, gy));
        winograd_weights(s, cout, cin)
    })
}

/// Floats of one channel's transformed tiles for a chunk of `len`: 16 rows of an odd
/// number of floats, as rows a power of two of floats apart alias in the cache, in the
/// transforms' writes and in the products' packing (measured: 2048 tiles ran at half speed).
fn tile_block(len: usize) -> usize {
    16 * (len | 1)
}

/// `S_ξ` of [`grad_weight_winograd`] into `s`, chunk by chunk. Every element of `s` is
/// written and every element of `v` and `gy` that is read was written first, so the
/// scratch needs no zeroing.
fn transformed_sums(
    (g, x): (&[f32], &[f32]),
    d: ConvDims,
    chunk: usize,
    (s, v, gy): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (n, cin, cout, h, w, _, _) = d;
    let grid = (h, w, h.div_ceil(2) * w.div_ceil(2));
    let total = n * grid.2;
    for j0 in (0..total).step_by(chunk) {
        let len = chunk.min(total - j0);
        let (v, gy) = (
            &mut v[..tile_block(len) * cin],
            &mut gy[..tile_block(len) * cout],
        );
        v.par_chunks_mut(tile_block(len))
            .enumerate()
            .for_each(|(c, dst)| input_tiles(x, (c, cin), grid, (j0, len), dst));
        gy.par_chunks_mut(tile_block(len))
            .enumerate()
            .for_each(|(c, dst)| gradient_tiles(g, (c, cout), grid, (j0, len), dst));
        let rs = tile_block(len) as isize;
        s.par_chunks_mut(cout * cin)
            .enumerate()
            .for_each(|(xi, s_xi)| {
                // SAFETY: S_ξ is cout × cin (rows cin apart); Ŷ_ξ is cout × len and V_ξ is
                // cin × len (rows `tile_block(len)` apart, from ξ·(len | 1)), read transposed.
                unsafe {
                    gemm(
                        cout,
                        cin,
                        len,
                        s_xi.as_mut_ptr(),
                        1,
                        cin as isize,
                        j0 > 0,
                        gy[xi * (len | 1)..].as_ptr(),
                        1,
                        rs,
                        v[xi * (len | 1)..].as_ptr(),
                        rs,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            });
    }
}

/// `∂w = Gᵀ·S·G` for every weight, from the 16 `cout × cin` sums in `s`.
fn winograd_weights(s: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut out = vec![0f32; cout * cin * 9];
    out.par_chunks_mut(cin * 9)
        .enumerate()
        .for_each(|(co, row)| {
            for (ci, dw) in row.chunks_exact_mut(9).enumerate() {
                let at = |xi: usize| s[(xi * cout + co) * cin + ci];
                // Gᵀ·S column by column, then ·G row by row.
                let cols: [[f32; 3]; 4] =
                    std::array::from_fn(|c| gt(std::array::from_fn(|r| at(r * 4 + c))));
                for a in 0..3 {
                    dw[a * 3..][..3].copy_from_slice(&gt(std::array::from_fn(|c| cols[c][a])));
                }
            }
        });
    out
}

thread_local! {
    /// Scratch of [`grad_weight_winograd`] (sums, transformed inputs and gradients), kept
    /// between calls: fresh zeroed buffers cost a single-threaded fill of ~50 MB per call.
    static WINOGRAD_SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// The first `len` elements of `v`, grown (zero-filled, once) if shorter.
fn grown(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Gᵀ·u for F(2×2, 3×3)'s G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
#[inline(always)]
fn gt(u: [f32; 4]) -> [f32; 3] {
    let (p, m) = (0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]));
    [u[0] + p, m, p + u[3]]
}

/// `(h, w, tiles per image)` of a 2×2-tiled map.
type TileMap = (usize, usize, usize);

/// Runs `f(img, ty, tx0, k, n_tx)` for each run of tiles `j0..j0 + len` (over the batch)
/// that lies in one row of tiles: image, tile row, first tile column, index in the chunk
/// and count.
fn tile_rows(
    (j0, len): (usize, usize),
    tiles: usize,
    tw: usize,
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let mut j = 0;
    while j < len {
        let (img, t) = ((j0 + j) / tiles, (j0 + j) % tiles);
        let (ty, tx0) = (t / tw, t % tw);
        let n_tx = (tw - tx0).min(len - j);
        f(img, ty, tx0, j, n_tx);
        j += n_tx;
    }
}

/// Fills each `wp`-long row of `rows` with a row of the `w`-wide `plane`, from plane row
/// `first` on, shifted right by `left` columns; zero outside the plane.
fn padded_rows(
    plane: &[f32],
    w: usize,
    (first, left): (isize, usize),
    wp: usize,
    rows: &mut [f32],
) {
    let h = plane.len() / w;
    for (r, row) in rows.chunks_exact_mut(wp).enumerate() {
        row.fill(0.0);
        let y = first + r as isize;
        if (0..h as isize).contains(&y) {
            row[left..][..w].copy_from_slice(&plane[y as usize * w..][..w]);
        }
    }
}

/// V = Bᵀ·d·B of channel `c` for the tiles `j0..j0 + len` (over the batch) of the `(n,
/// channels, h, w)` input `x`, each 4×4 input tile read from one row and column before its
/// 2×2 output tile (zero outside), into `dst` laid out `[16][len | 1]`. A row of tiles at a
/// time: Bᵀ down the columns of four padded input rows, then ·B along them.
fn input_tiles(
    x: &[f32],
    (c, channels): (usize, usize),
    (h, w, tiles): TileMap,
    chunk: (usize, usize),
    dst: &mut [f32],
) {
    let ld = chunk.1 | 1;
    let tw = w.div_ceil(2);
    let wp = 2 * tw + 2;
    let mut rows = vec![0f32; 4 * wp];
    let mut e = vec![0f32; 4 * wp];
    tile_rows(chunk, tiles, tw, |img, ty, tx0, j, n_tx| {
        let plane = &x[(img * channels + c) * h * w..][..h * w];
        // Input rows 2·ty − 1 … 2·ty + 2, one column of padding on the left.
        padded_rows(plane, w, ((2 * ty) as isize - 1, 1), wp, &mut rows);
        let (r0, rest) = rows.split_at(wp);
        let (r1, rest) = rest.split_at(wp);
        let (r2, r3) = rest.split_at(wp);
        // Bᵀ down the columns, one output row e_i at a time.
        let (e0, rest) = e.split_at_mut(wp);
        let (e1, rest) = rest.split_at_mut(wp);
        let (e2, e3) = rest.split_at_mut(wp);
        for xx in 0..wp {
            [e0[xx], e1[xx], e2[xx], e3[xx]] = bt::<4>([r0[xx], r1[xx], r2[xx], r3[xx]]);
        }
        // ·B along each e_i: the tiles' values of one (i, jj) are contiguous in `dst`.
        let span = 2 * n_tx + 2;
        for (i, ei) in e.chunks_exact(wp).enumerate() {
            let ei = &ei[2 * tx0..][..span];
            let out = |jj: usize| (i * 4 + jj) * ld + j;
            let pairs = || ei.windows(4).step_by(2);
            for (o, q) in dst[out(0)..][..n_tx].iter_mut().zip(pairs()) {
                *o = q[0] - q[2];
            }
            for (o, q) in dst[out(1)..][..n_tx].iter_mut().zip(pairs()) {
                *o = q[1] + q[2];
            }
            for (o, q) in dst[out(2)..][..n_tx].iter_mut().zip(pairs()) {
                *o = q[2] - q[1];
            }
            for (o, q) in dst[out(3)..][..n_tx].iter_mut().zip(pairs()) {
                *o = q[1] - q[3];
            }
        }
    });
}

/// Ŷ = A·∂Y·Aᵀ of channel `c` for the tiles `j0..j0 + len` of the `(n, channels, h, w)`
/// output gradient `g` (zero past an odd edge), into `dst` laid out `[16][len | 1]`.
fn gradient_tiles(
    g: &[f32],
    (c, channels): (usize, usize),
    (h, w, tiles): TileMap,
    chunk: (usize, usize),
    dst: &mut [f32],
) {
    let ld = chunk.1 | 1;
    let tw = w.div_ceil(2);
    let wp = 2 * tw;
    let mut rows = vec![0f32; 2 * wp];
    let mut col = vec![0f32; wp];
    tile_rows(chunk, tiles, tw, |img, ty, tx0, j, n_tx| {
        let plane = &g[(img * channels + c) * h * w..][..h * w];
        padded_rows(plane, w, ((2 * ty) as isize, 0), wp, &mut rows);
        // A = [1 0; 1 1; 1 −1; 0 −1] down the columns, one row of A·∂Y at a time, then ·Aᵀ
        // along it: the tiles' values of one (r, cc) are contiguous in `dst`.
        let (r0, r1) = rows.split_at(wp);
        let (r0, r1) = (&r0[2 * tx0..][..2 * n_tx], &r1[2 * tx0..][..2 * n_tx]);
        for r in 0..4 {
            let col = &mut col[..2 * n_tx];
            let rows = col.iter_mut().zip(r0.iter().zip(r1));
            match r {
                0 => rows.for_each(|(c, (&a, _))| *c = a),
                1 => rows.for_each(|(c, (&a, &b))| *c = a + b),
                2 => rows.for_each(|(c, (&a, &b))| *c = a - b),
                _ => rows.for_each(|(c, (_, &b))| *c = -b),
            }
            let pairs = || col.chunks_exact(2);
            let out = |cc: usize| (r * 4 + cc) * ld + j;
            for (o, p) in dst[out(0)..][..n_tx].iter_mut().zip(pairs()) {
                *o = p[0];
            }
            for (o, p) in dst[out(1)..][..n_tx].iter_mut().zip(pairs()) {
                *o = p[0] + p[1];
            }
            for (o, p) in dst[out(2)..][..n_tx].iter_mut().zip(pairs()) {
                *o = p[0] - p[1];
            }
            for (o, p) in dst[out(3)..][..n_tx].iter_mut().zip(pairs()) {
                *o = -p[1];
            }
        }
    });
}

/// Positions `q0..q0 + len` of the channels in `input` (one image's, `channels × h × w`).
struct Band<'a> {
    input: &'a [f32],
    q0: usize,
    len: usize,
}

/// `dst += g_img[:, band] · columns(band)ᵀ`: the weight-gradient contribution of one band of
/// positions, for the input channels of `band` (`rows` = channels·k·k gradient columns).
/// A 1×1 stride-1 convolution reads its columns straight from the input (rows q apart);
/// anything else copies them into an im2col band in `cols`.
///
/// # Safety
/// `dst` must point at a `cout × rows` block whose rows are `dst_rs` apart, written by no
/// other thread meanwhile; `g_img` starts at the image's `cout × q` output gradient.
unsafe fn accumulate_band(
    geo: &Geometry,
    d: ConvDims,
    band: Band,
    g_img: &[f32],
    cols: &mut [f32],
    dst: *mut f32,
    dst_rs: usize,
) {
    let (_, _, cout, h, w, ho, wo) = d;
    let q = ho * wo;
    let rows = band.input.len() / (h * w) * geo.k * geo.k;
    let pointwise = geo.k == 1 && geo.stride == 1 && geo.padding == 0;
    let (cols, cols_rs): (&[f32], usize) = if pointwise {
        (&band.input[band.q0..], q)
    } else {
        let cols = &mut cols[..rows * band.len];
        im2col(geo, band.input, h, w, band.q0, band.len, cols);
        (cols, band.len)
    };
    gemm(
        cout,
        rows,
        band.len,
        dst,
        1,
        dst_rs as isize,
        true,
        g_img[band.q0..].as_ptr(),
        1,
        q as isize,
        cols.as_ptr(),
        cols_rs as isize,
        1,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// The weight gradient's buffer, shared by threads that write disjoint column blocks.
struct SharedOut(*mut f32);
// SAFETY: every thread writes its own columns (see `grad_weight`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must be within the buffer.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// Input channels per block of [`grad_weight`]: blocks of ~256 gradient columns, at least two
/// per thread, preferably equal and as many per thread (a 9th block on 2 threads idled one
/// of them for a ninth of the time).
fn channel_block(cin: usize, taps: usize, threads: usize) -> usize {
    let rows_off = |b: usize| (cin * taps / b).abs_diff(256);
    let even = (2 * threads..=cin)
        .filter(|&b| b.is_multiple_of(threads) && cin.is_multiple_of(b))
        .min_by_key(|&b| rows_off(b));
    match even {
        Some(b) => cin / b,
        None => cin.div_ceil(((cin * taps) / 256).max(2 * threads).min(cin)),
    }
}

/// [`grad_weight`] for few input channels (the stem): the positions are split among the
/// threads, each summing a whole `cout × cin·k·k` partial gradient.
fn grad_weight_by_positions(g: &[f32], x: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
    let (n, cin, cout, h, w, ho, wo) = d;
    let kk = cin * geo.k * geo.k;
    let q = ho * wo;
    let nb = (BAND_FLOATS / (cout + kk)).clamp(64, 2048);
    let bands = q.div_ceil(nb);
    let jobs = n * bands;
    // A fixed split of the work, summed in order: the result does not depend on the thread
    // count or on scheduling, so training runs (and resumes) are reproducible.
    let chunks = jobs.min(GRAD_CHUNKS);
    let pointwise = geo.k == 1 && geo.stride == 1 && geo.padding == 0;
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cout * kk];
            let mut cols = vec![0f32; if pointwise { 0 } else { kk * nb }];
            for job in c * jobs / chunks..(c + 1) * jobs / chunks {
                let (img, b) = (job / bands, job % bands);
                let q0 = b * nb;
                let len = nb.min(q - q0);
                let band = Band {
                    input: &x[img * cin * h * w..][..cin * h * w],
                    q0,
                    len,
                };
                // SAFETY: acc is cout × kk, owned by this chunk.
                unsafe {
                    accumulate_band(
                        &geo,
                        d,
                        band,
                        &g[img * cout * q..],
                        &mut cols,
                        acc.as_mut_ptr(),
                        kk,
                    )
                };
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Candle's ops on the same inputs (strided convolutions as stride 1, subsampled).
    fn reference(
        x: &Tensor,
        w: &Tensor,
        s: usize,
        p: usize,
        b: Option<&Tensor>,
        r: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        let dense = x.conv2d(w, p, 1, 1, 1).unwrap();
        let (_, _, dh, dw) = dense.dims4().unwrap();
        let dev = x.device();
        let pick = |n: usize| Tensor::arange_step(0u32, n as u32, s as u32, dev).unwrap();
        let mut y = dense
            .index_select(&pick(dh), 2)
            .unwrap()
            .index_select(&pick(dw), 3)
            .unwrap();
        if let Some(b) = b {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
        }
        if let Some(r) = r {
            y = (y + r).unwrap();
        }
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    /// Gradients of `Σ m·a` and `Σ m·b` for one random `m`: position-dependent weights, so
    /// that gradients are not uniform.
    fn weighted_sum_grads(a: &Tensor, b: &Tensor) -> (GradStore, GradStore) {
        let m = Tensor::randn(0f32, 1.0, a.dims(), a.device()).unwrap();
        let grads = |t: &Tensor| (t * &m).unwrap().sum_all().unwrap().backward().unwrap();
        (grads(a), grads(b))
    }

    /// The Winograd weight gradient against float64 direct sums, with chunks that split
    /// images and end mid-row, and odd sizes that leave partial tiles.
    #[test]
    fn winograd_weight_gradient_matches_float64() {
        let dev = Device::Cpu;
        for (n, cin, cout, h, w, budget) in [
            (2, 5, 7, 9, 11, 16 * 12 * 7),
            (3, 16, 4, 8, 6, 16 * 20 * 5),
            (1, 3, 3, 5, 5, 1 << 20),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (n, cout, h, w), &dev).unwrap();
            let (xv, gv) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let ours = grad_weight_winograd(&gv, &xv, (n, cin, cout, h, w, h, w), budget);
            // ∂w[o, i, a, b] = Σ g[o, y, x] · x[i, y + a − 1, x + b − 1].
            let mut worst = 0f64;
            let scale = (n * h * w) as f64;
            for o in 0..cout {
                for i in 0..cin {
                    for (a, b) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                        let mut sum = 0f64;
                        for img in 0..n {
                            for y in 0..h {
                                for xx in 0..w {
                                    let (iy, ix) = (y + a, xx + b);
                                    if iy < 1 || ix < 1 || iy > h || ix > w {
                                        continue;
                                    }
                                    let gval = gv[((img * cout + o) * h + y) * w + xx] as f64;
                                    let xval =
                                        xv[((img * cin + i) * h + iy - 1) * w + ix - 1] as f64;
                                    sum += gval * xval;
                                }
                            }
                        }
                        let ours = ours[((o * cin + i) * 3 + a) * 3 + b] as f64;
                        worst = worst.max((ours - sum).abs() / scale.sqrt());
                    }
                }
            }
            // Sums of n·h·w unit products are ~sqrt(n·h·w) large; float32 rounding of them
            // stays below 1e-5 of that.
            assert!(worst < 1e-5, "n{n} {cin}->{cout} {h}x{w}: error {worst:e}");
        }
    }

    #[test]
    fn fused_train_conv_gradients_match_candle() {
        let dev = Device::Cpu;
        for (cin, cout, k, s, p, h, w) in [
            (4, 6, 3, 1, 1, 7, 9),
            (4, 6, 3, 2, 1, 7, 10),
            (3, 5, 7, 2, 3, 13, 11),
            (6, 4, 1, 2, 0, 9, 8),
            (24, 12, 1, 1, 0, 9, 11),
            (130, 8, 3, 1, 1, 6, 5),
            (8, 130, 3, 1, 1, 9, 7),
            (130, 140, 3, 1, 1, 10, 11),
            (64, 48, 3, 2, 1, 24, 20),
            (64, 48, 1, 2, 0, 25, 21),
            (300, 20, 3, 2, 1, 9, 8),
            (128, 256, 3, 2, 1, 50, 67),
            (128, 256, 1, 2, 0, 50, 67),
            // More positions than one weight-gradient band holds.
            (64, 8, 3, 1, 1, 48, 48),
            // Above the Winograd threshold, forward and input gradient.
            (130, 140, 3, 1, 1, 13, 14),
            // Winograd weight gradients, odd and even sizes.
            (130, 140, 3, 1, 1, 17, 19),
            (8, 130, 3, 1, 1, 24, 15),
        ] {
            // (learned bias, residual, relu), including the bias-into-residual case.
            for (bias, res, relu) in [
                (false, false, false),
                (true, false, true),
                (false, true, true),
                (true, true, false),
                (true, true, true),
            ] {
                let x = Var::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
                let wt = Var::randn(0f32, 0.2, (cout, cin, k, k), &dev).unwrap();
                let b = Var::randn(0f32, 0.5, cout, &dev).unwrap();
                let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
                let r = Var::randn(0f32, 1.0, (2, cout, ho, wo), &dev).unwrap();
                let (bt, rt) = (bias.then(|| b.as_tensor()), res.then(|| r.as_tensor()));
                let tb = bt.map_or(TrainBias::None, TrainBias::Learned);
                let ours =
                    conv2d_train_fused(x.as_tensor(), wt.as_tensor(), s, p, tb, rt, relu).unwrap();
                let theirs = reference(x.as_tensor(), wt.as_tensor(), s, p, bt, rt, relu);
                assert_eq!(ours.dims(), theirs.dims());
                let e = max_abs(&(&ours - &theirs).unwrap()) / max_abs(&theirs);
                // F(4×4, 3×3) Winograd errs by up to ~2e-5 of the largest value.
                assert!(e < 4e-5, "k{k} s{s} {cin}->{cout}: forward rel err {e}");
                // Values within rounding of zero may fall either side of the ReLU: the
                // reference gradient takes the ReLU's mask from our output.
                let theirs = if relu {
                    let pre = reference(x.as_tensor(), wt.as_tensor(), s, p, bt, rt, false);
                    let mask = ours.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
                    (pre * mask).unwrap()
                } else {
                    theirs
                };
                let (lo, lt) = weighted_sum_grads(&ours, &theirs);
                let mut checked = vec![&x, &wt];
                checked.extend(bias.then_some(&b));
                checked.extend(res.then_some(&r));
                for v in checked {
                    let a = lo.get(v.as_tensor()).expect("gradient");
                    let t = lt.get(v.as_tensor()).unwrap();
                    let rel = max_abs(&(a - t).unwrap()) / max_abs(t);
                    assert!(
                        rel < 4e-5,
                        "k{k} s{s} {cin}->{cout} {h}x{w} bias {bias} res {res} relu {relu}: \
                         grad {:?} rel err {rel}",
                        v.dims()
                    );
                }
            }
        }
    }

    /// A Winograd F(2×2, 3×3) forward (as the v1 head trains) with bias and ReLU: values and
    /// gradients as Candle's.
    #[test]
    fn winograd_forward_train_conv_matches_candle() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 130, 17, 19), &dev).unwrap();
        let wt = Var::randn(0f32, 0.05, (140, 130, 3, 3), &dev).unwrap();
        let b = Var::randn(0f32, 0.5, 140, &dev).unwrap();
        let bias = TrainBias::Learned(b.as_tensor());
        let conv = TrainConv2d::with_algorithm(wt.as_tensor(), bias, 1, 1, Algorithm::Winograd2)
            .unwrap()
            .expect("f32 CPU conv");
        for relu in [false, true] {
            let ours = conv.forward(x.as_tensor(), None, relu).unwrap();
            let (xt, wtt, bt) = (x.as_tensor(), wt.as_tensor(), Some(b.as_tensor()));
            let pre = reference(xt, wtt, 1, 1, bt, None, false);
            let e = max_abs(&(&ours - &reference(xt, wtt, 1, 1, bt, None, relu)).unwrap());
            assert!(e / max_abs(&pre) < 4e-6, "forward rel err {e}");
            let theirs = if relu {
                let mask = ours.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
                (pre * mask).unwrap()
            } else {
                pre
            };
            let (lo, lt) = weighted_sum_grads(&ours, &theirs);
            for v in [&x, &wt, &b] {
                let (a, t) = (
                    lo.get(v.as_tensor()).unwrap(),
                    lt.get(v.as_tensor()).unwrap(),
                );
                let rel = max_abs(&(a - t).unwrap()) / max_abs(t);
                assert!(rel < 4e-5, "relu {relu}: grad {:?} rel err {rel}", v.dims());
            }
        }
    }

    #[test]
    fn frozen_norm_folded_matches_scaled_weight() {
        let dev = Device::Cpu;
        // Stride 1 (flipped-kernel input gradient) and 2 (scattered columns), with residual.
        for (cin, cout, k, s, p, res) in [(6, 10, 3, 1, 1, true), (8, 12, 3, 2, 1, false)] {
            let x = Var::randn(0f32, 1.0, (2, cin, 11, 9), &dev).unwrap();
            let wt = Var::randn(0f32, 0.2, (cout, cin, k, k), &dev).unwrap();
            let scale = Tensor::rand(0.5f32, 2.0, (1, cout, 1, 1), &dev).unwrap();
            let shift = Tensor::randn(0f32, 1.0, (1, cout, 1, 1), &dev).unwrap();
            let (ho, wo) = ((11 + 2 * p - k) / s + 1, (9 + 2 * p - k) / s + 1);
            let r = Tensor::randn(0f32, 1.0, (2, cout, ho, wo), &dev).unwrap();
            let r = res.then_some(&r);
            let norm = TrainBias::FrozenNorm {
                scale: &scale,
                shift: &shift,
            };
            let ours =
                conv2d_train_fused(x.as_tensor(), wt.as_tensor(), s, p, norm, r, true).unwrap();
            let scaled = wt
                .as_tensor()
                .broadcast_mul(&scale.reshape((cout, 1, 1, 1)).unwrap())
                .unwrap();
            let shift_bias = TrainBias::Constant(&shift);
            let theirs =
                conv2d_train_fused(x.as_tensor(), &scaled, s, p, shift_bias, r, true).unwrap();
            assert!(max_abs(&(&ours - &theirs).unwrap()) < 1e-6);
            let (lo, lt) = weighted_sum_grads(&ours, &theirs);
            for v in [&x, &wt] {
                let (a, t) = (lo.get(v).expect("gradient"), lt.get(v).unwrap());
                let rel = max_abs(&(a - t).unwrap()) / max_abs(t);
                assert!(rel < 1e-6, "s{s} grad {:?}: rel err {rel}", v.dims());
            }
            assert!(lo.get(&scale).is_none() && lo.get(&shift).is_none());
        }
    }

    #[test]
    fn constant_bias_gets_no_gradient_and_untracked_input_none() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 6), &dev).unwrap();
        let wt = Var::randn(0f32, 0.2, (5, 4, 3, 3), &dev).unwrap();
        let shift = Tensor::randn(0f32, 1.0, (1, 5, 1, 1), &dev).unwrap();
        let y = conv2d_train_fused(
            &x,
            wt.as_tensor(),
            1,
            1,
            TrainBias::Constant(&shift),
            None,
            true,
        )
        .unwrap();
        let theirs = reference(&x, wt.as_tensor(), 1, 1, Some(&shift), None, true);
        assert!(max_abs(&(&y - &theirs).unwrap()) < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&shift).is_none());
        assert!(grads.get(wt.as_tensor()).is_some());
    }
}
