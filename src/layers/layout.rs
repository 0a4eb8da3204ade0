//! Layout changes with fast CPU forms and exact gradients: the head's channels-last
//! transpose and the FPN's nearest upsampling.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::{f32_slice, with_host};

/// `(N, C, H, W)` → `(N, H, W, C)`, contiguous and differentiable: the head's outputs per
/// anchor. On f32 CPU tensors a parallel blocked transpose (Candle's strided copy is
/// single-threaded, and the class outputs are ~10⁷ values per training batch).
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if !(crate::kernels::native(x.device()) && x.dtype() == DType::F32) {
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

/// Nearest upsampling to `(h, w)`, as torchvision's `F.interpolate(size=…)`. An exact 2×
/// (always the case for batches padded to a multiple of 32) is one parallel op for f32 on the
/// CPU and elsewhere reshape and broadcast: the same values, and correct gradients, whereas
/// Candle's `upsample_nearest2d` backward overwrites the gradient already accumulated for
/// its input.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, xh, xw) = x.dims4()?;
    if (h, w) == (2 * xh, 2 * xw) && crate::kernels::native(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Upsample2x)
    } else if (h, w) == (2 * xh, 2 * xw) {
        x.reshape((n, c, xh, 1, xw, 1))?
            .broadcast_as((n, c, xh, 2, xw, 2))?
            .reshape((n, c, h, w))
    } else {
        x.upsample_nearest2d(h, w)
    }
}

/// Exact 2× nearest upsampling of a contiguous f32 CPU `(n, c, h, w)` tensor, planes in
/// parallel. Its backward sums each 2×2 block of the output gradient in one parallel pass;
/// through broadcast and reshape, Candle summed them with a single-threaded strided
/// reduction (≈ 40 ms of every R50 training step at 512², while the other core idled).
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = f32_slice(s, l)?;
        let mut out = vec![0f32; n * c * 4 * h * w];
        out.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for (pair, row) in dst.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                    let (top, bottom) = pair.split_at_mut(2 * w);
                    for (d, &v) in top.chunks_exact_mut(2).zip(row) {
                        d.fill(v);
                    }
                    bottom.copy_from_slice(top);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let sums = with_host(grad, |g| {
            let mut out = vec![0f32; n * c * h * w];
            out.par_chunks_mut(h * w)
                .zip(g.par_chunks(4 * h * w))
                .for_each(|(dst, src)| {
                    for (row, pair) in dst.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
                        let (top, bottom) = pair.split_at(2 * w);
                        let blocks = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                        for (d, (t, b)) in row.iter_mut().zip(blocks) {
                            *d = (t[0] + t[1]) + (b[0] + b[1]);
                        }
                    }
                });
            out
        })?;
        Ok(Some(Tensor::from_vec(sums, (n, c, h, w), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn upsample_2x_matches_candle_and_accumulates_gradients() {
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12.0, &Device::Cpu)
                .unwrap()
                .reshape((1, 2, 2, 3))
                .unwrap(),
        )
        .unwrap();
        let ours = upsample_nearest(x.as_tensor(), 4, 6).unwrap();
        let theirs = x.as_tensor().upsample_nearest2d(4, 6).unwrap();
        let diff = (&ours - &theirs).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // x is used twice: the gradient must be 1 (direct) + 4 (four copies) per element.
        let loss = (ours.sum_all().unwrap() + x.as_tensor().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert!(g.to_vec1::<f32>().unwrap().iter().all(|&v| v == 5.0));
    }

    /// The f32 CPU op against the reshape-and-broadcast path (taken for f64): the values,
    /// and the gradient of a weighted sum, where each 2×2 block has different weights.
    #[test]
    fn upsample_2x_op_matches_broadcast_path() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let m = Tensor::randn(0f32, 1.0, (2, 3, 10, 14), &dev).unwrap();
        let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let m64 = m.to_dtype(DType::F64).unwrap();
        let ours = upsample_nearest(x.as_tensor(), 10, 14).unwrap();
        let theirs = upsample_nearest(x64.as_tensor(), 10, 14).unwrap();
        let diff = (ours.to_dtype(DType::F64).unwrap() - &theirs).unwrap();
        assert_eq!(
            diff.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        let g = (ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g64 = (theirs * &m64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        let g64 = g64.get(x64.as_tensor()).unwrap();
        let err = (g - g64).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f64>().unwrap() < 1e-5);
    }
}
