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
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

use crate::kernels::{
    channel_sums, f32_slice, grad_input_strided, grad_weight, scale_rows, scale_rows_in_place,
    with_host, Algorithm, FusedConv2d, Geometry, Precision,
};

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
        Some(conv) if crate::kernels::native(x.device()) && x.dtype() == DType::F32 => {
            conv.forward(x, residual, relu)
        }
        _ => candle_conv(x, w, (stride, padding), bias, residual, relu),
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
    /// it is chosen per layer (as the head does). Measured with F(2×2, 3×3) in train
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
        let fits = crate::kernels::native(weight.device()) && weight.dtype() == DType::F32;
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

/// The values of a bias (zeros when absent).
fn constant(bias: TrainBias, cout: usize) -> Result<Vec<f32>> {
    match bias {
        TrainBias::None => Ok(vec![0.0; cout]),
        TrainBias::Constant(b) | TrainBias::Learned(b) | TrainBias::FrozenNorm { shift: b, .. } => {
            channel_values(b, cout)
        }
    }
}

/// Candle's ops: the convolution as one matrix product over the unfolded input
/// ([`conv2d_unfolded`]), whose backward is matrix products too. Also where nothing needs a
/// gradient (a frozen stem): with Candle's own conv2d there, the float32 weight gradient of
/// the first trained convolution, a sum with heavy cancellation, moved 2.4e-2 from float64
/// in the v1 train parity (bound 1e-2); through the products, 6.3e-3, as this crate's kernels.
fn candle_conv(
    x: &Tensor,
    w: &Tensor,
    (stride, padding): (usize, usize),
    bias: TrainBias,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let cout = w.dim(0)?;
    let (w, bias) = match bias {
        TrainBias::FrozenNorm { scale, shift } => (
            w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?,
            TrainBias::Constant(shift),
        ),
        _ => (w.clone(), bias),
    };
    let b = match bias {
        TrainBias::None => None,
        TrainBias::Constant(b) | TrainBias::Learned(b) | TrainBias::FrozenNorm { shift: b, .. } => {
            Some(b)
        }
    };
    let y = conv2d_unfolded(x, &w, stride, padding)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    add_relu(y, residual, relu)
}

/// `x (n, cin, h, w) ⋆ w (cout, cin, k, k)` from Candle's differentiable ops on any device:
/// the k² strided taps of the zero-padded input stacked into columns `(n, cin·k², ho·wo)`,
/// times the kernel as a `(cout, cin·k²)` matrix. Candle's own conv2d backward goes through
/// conv_transpose2d, a direct loop (on the CPU and on CUDA) that is ~4.5× the forward's cost
/// and sums long float32 series in order: deep gradients came out 2e-2 from float64, where
/// torchvision's are within 3e-3. It also fails on strided convolutions whose height and
/// width leave different remainders (P6/P7 of a 25 × 34 P5). Here the backward is matrix
/// products (blocked sums; cuBLAS on CUDA) and slicing.
pub(crate) fn conv2d_unfolded(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, wcin, k, k2) = w.dims4()?;
    if wcin != cin || k != k2 || s == 0 || h + 2 * p < k || wd + 2 * p < k {
        candle_core::bail!(
            "conv2d: input {:?}, kernel {:?}, stride {s}, padding {p}",
            x.dims(),
            w.dims()
        );
    }
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    // Tap `d` of output `i` reads padded row `d + s·i`: at least k − 1 + s·ho rows.
    let (hp, wp) = (
        (k - 1 + s * ho).max(h + 2 * p),
        (k - 1 + s * wo).max(wd + 2 * p),
    );
    let xp = x
        .pad_with_zeros(2, p, hp - h - p)?
        .pad_with_zeros(3, p, wp - wd - p)?;
    let mut taps = Vec::with_capacity(k * k);
    for dy in 0..k {
        let rows = every(&xp.narrow(2, dy, s * ho)?, 2, s)?;
        for dx in 0..k {
            taps.push(every(&rows.narrow(3, dx, s * wo)?, 3, s)?);
        }
    }
    let cols = Tensor::stack(&taps, 2)?.reshape((n, cin * k * k, ho * wo))?;
    let kernel = w.reshape((cout, cin * k * k))?.broadcast_left(n)?;
    kernel.matmul(&cols)?.reshape((n, cout, ho, wo))
}

/// Every `s`-th element along `dim` of a tensor whose size there is a multiple of `s`.
fn every(t: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    let len = dims[dim] / s;
    dims[dim] = len;
    dims.insert(dim + 1, s);
    let mut picked = dims.clone();
    picked.remove(dim + 1);
    t.reshape(dims)?.narrow(dim + 1, 0, 1)?.reshape(picked)
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
        self.forward((f32_slice(xs, xl)?, xl), wl, None)
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
        let extra = f32_slice(es, el)?;
        let _ = ws;
        self.forward((f32_slice(xs, xl)?, xl), wl, Some(extra))
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
        algorithm,
        Precision::F32,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

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

    #[test]
    fn fused_train_conv_gradients_match_candle() {
        check_train_conv_gradients();
    }

    /// The same table on Candle's ops alone (the GPU path): [`conv2d_unfolded`] for every
    /// tracked convolution.
    #[test]
    fn unfolded_conv_gradients_match_candle() {
        use crate::kernels::{scoped, Kernels};
        scoped(Kernels::Candle, check_train_conv_gradients);
    }

    fn check_train_conv_gradients() {
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
