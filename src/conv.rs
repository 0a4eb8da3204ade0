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
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl FusedConv2d {
    /// Prepares `weight` `(cout, cin, k, k)` and `bias` `(cout,)`.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            candle_core::bail!("unsupported conv: kernel {k}×{k2}, stride {stride}");
        }
        let w = weight.to_dtype(DType::F32)?;
        let packed = if stride == 1 {
            w.permute((2, 3, 0, 1))?.contiguous()?
        } else {
            w
        };
        Ok(Self {
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

    /// One image: `x` is `cin × h × w`, `out` is `cout × ho × wo`, pre-filled with the
    /// residual (or zeros).
    fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32], relu: bool) {
        let (ho, wo) = self.output_size(h, w);
        for (o, b) in out.chunks_exact_mut(ho * wo).zip(&self.bias) {
            o.iter_mut().for_each(|v| *v += b);
        }
        if self.stride == 1 && self.k == 1 && self.padding == 0 {
            // SAFETY: out is cout × (h·w), taps is cout × cin, x is cin × (h·w).
            unsafe { self.product(out, h * w, h * w, &self.packed, self.cin, x, h * w) };
        } else if self.stride == 1 {
            self.run_shifted(x, h, w, out);
        } else {
            self.run_im2col(x, h, w, out);
        }
        if relu {
            out.par_chunks_mut(4096)
                .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
    }

    /// Stride 1: Σ over taps of `W_tap · shift(x_padded)`, on the padded width.
    fn run_shifted(&self, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (k, p) = (self.k, self.padding);
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let (ho, wo) = self.output_size(h, w);
        let padded = pad(x, self.cin, h, w, p);
        // Output on the padded width: columns wo..wp of each row are scratch.
        let mut wide = vec![0f32; self.cout * ho * wp];
        spread(out, &mut wide, self.cout, ho, wo, wp);
        let n = (ho - 1) * wp + wo;
        let tap_len = self.cout * self.cin;
        for ky in 0..k {
            for kx in 0..k {
                let tap = &self.packed[(ky * k + kx) * tap_len..][..tap_len];
                let rhs = &padded[ky * wp + kx..];
                // SAFETY: rows of rhs start at ci·hp·wp + ky·wp + kx and read n ≤
                // hp·wp − ky·wp − kx values; wide rows are ho·wp ≥ n long.
                unsafe { self.product(&mut wide, n, ho * wp, tap, self.cin, rhs, hp * wp) };
            }
        }
        compact(&wide, out, self.cout, ho, wo, wp);
    }

    /// Stride > 1: im2col over bands of output rows, one product per band.
    fn run_im2col(&self, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (ho, wo) = self.output_size(h, w);
        let kk = self.cin * self.k * self.k;
        // About 8 MB of columns per band.
        let rows = ((2 << 20) / (kk * wo).max(1)).clamp(1, ho);
        let mut cols = vec![0f32; kk * rows * wo];
        for y0 in (0..ho).step_by(rows) {
            let band = rows.min(ho - y0);
            let n = band * wo;
            self.im2col(x, h, w, y0, band, &mut cols[..kk * n]);
            // SAFETY: out rows are ho·wo long and the band starts at y0·wo.
            unsafe {
                self.product(&mut out[y0 * wo..], n, ho * wo, &self.packed, kk, &cols, n);
            }
        }
    }

    fn im2col(&self, x: &[f32], h: usize, w: usize, y0: usize, band: usize, cols: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.padding);
        let wo = self.output_size(h, w).1;
        cols.par_chunks_mut(band * wo)
            .enumerate()
            .for_each(|(row, col)| {
                let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
                let plane = &x[ci * h * w..][..h * w];
                for (yy, dst) in col.chunks_exact_mut(wo).enumerate() {
                    let iy = ((y0 + yy) * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    for (xx, d) in dst.iter_mut().enumerate() {
                        let ix = (xx * s + kx) as isize - p as isize;
                        *d = if ix < 0 || ix >= w as isize {
                            0.0
                        } else {
                            src[ix as usize]
                        };
                    }
                }
            });
    }

    /// `dst[co][j] += Σ_c lhs[co][c] · rhs[c·rhs_rs + j]` for j < n, with `dst` rows
    /// `dst_rs` apart.
    ///
    /// # Safety
    /// `dst` must hold `cout` rows of `dst_rs ≥ n`, `lhs` `cout × kdim`, and `rhs` `kdim`
    /// rows of `rhs_rs` with `n` readable values each.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        &self,
        dst: &mut [f32],
        n: usize,
        dst_rs: usize,
        lhs: &[f32],
        kdim: usize,
        rhs: &[f32],
        rhs_rs: usize,
    ) {
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        gemm(
            self.cout,
            n,
            kdim,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            true,
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
            parallelism,
        );
    }
}

/// Zero-pads each of `c` planes of `h × w` by `p` on every side.
fn pad(x: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2 * p, w + 2 * p);
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

/// Copies `c × ho × wo` into rows of width `wp`.
fn spread(src: &[f32], dst: &mut [f32], c: usize, ho: usize, wo: usize, wp: usize) {
    dst.par_chunks_mut(ho * wp)
        .zip(src.par_chunks(ho * wo))
        .take(c)
        .for_each(|(d, s)| {
            for (y, row) in s.chunks_exact(wo).enumerate() {
                d[y * wp..][..wo].copy_from_slice(row);
            }
        });
}

/// Copies rows of width `wp` back to `c × ho × wo`.
fn compact(src: &[f32], dst: &mut [f32], c: usize, ho: usize, wo: usize, wp: usize) {
    dst.par_chunks_mut(ho * wo)
        .zip(src.par_chunks(ho * wp))
        .take(c)
        .for_each(|(d, s)| {
            for (y, row) in d.chunks_exact_mut(wo).enumerate() {
                row.copy_from_slice(&s[y * wp..][..wo]);
            }
        });
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
            Conv::Plain(c) => {
                let mut y = c.forward(x)?;
                if let Some(r) = residual {
                    y = (y + r)?;
                }
                if relu {
                    y.relu()
                } else {
                    Ok(y)
                }
            }
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
    }
}
