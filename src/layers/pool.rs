//! The stem's max pool, torchvision's `nn.MaxPool2d(3, stride 2, padding 1)`, with its
//! backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

use crate::kernels::{host, slice};

/// `MaxPool2d(3, stride 2, padding 1)` of an `(N, C, H, W)` tensor. A tracked tensor
/// back-propagates: each output's gradient goes to the input position that gave its maximum
/// (the first in row-major order among ties, the last NaN if any, as PyTorch), summed where
/// windows overlap. f32 and f64 on the CPU run this crate's op (an untracked f32 tensor in
/// one pass without indices); elsewhere (other devices, [`crate::kernels::Kernels::Candle`])
/// Candle's pool, or for a tracked tensor Candle's differentiable ops ([`max_pool_ops`]).
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    let tracked = x.track_op();
    let op = MaxPool {
        differentiable: tracked || x.dtype() != DType::F32,
    };
    match x.dtype() {
        DType::F32 | DType::F64 if crate::kernels::native(x.device()) => {
            x.contiguous()?.apply_op1(op)
        }
        _ if tracked => max_pool_ops(x),
        // Replicate-padding gives the same maxima as PyTorch's implicit −∞ padding.
        _ => x
            .pad_with_same(D::Minus1, 1, 1)?
            .pad_with_same(D::Minus2, 1, 1)?
            .max_pool2d_with_stride(3, 2),
    }
}

/// The pool from Candle's differentiable ops on any device (Candle's own max pool has no
/// backward): the maximum of the nine strided window taps of the replicate-padded input.
/// `maximum` splits a tie's gradient between its sides; ties with a padded copy return to
/// the same element, and ties between distinct positive activations are vanishingly rare
/// (equal zeros after a ReLU get no gradient through it), so the gradients match PyTorch's.
fn max_pool_ops(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = (pooled(h), pooled(w));
    // Tap `d` of output row `i` reads padded row `2i + d`: pad to at least 2·ho + 2 rows.
    let padded = x
        .pad_with_same(D::Minus1, 1, 2 * wo + 1 - w)?
        .pad_with_same(D::Minus2, 1, 2 * ho + 1 - h)?;
    let (n, c, _, _) = padded.dims4()?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = padded
            .narrow(2, dy, 2 * ho)?
            .reshape((n, c, ho, 2, 2 * wo + 2))?
            .narrow(3, 0, 1)?;
        for dx in 0..3 {
            let tap = rows
                .narrow(4, dx, 2 * wo)?
                .reshape((n, c, ho, wo, 2))?
                .narrow(4, 0, 1)?
                .reshape((n, c, ho, wo))?;
            out = Some(match out {
                Some(m) => m.maximum(&tap)?,
                None => tap,
            });
        }
    }
    match out {
        Some(m) => Ok(m),
        None => candle_core::bail!("max pool: no window taps"),
    }
}

/// The pool as an op.
struct MaxPool {
    /// Whether outputs come from their windows' argmax (which the backward needs), rather
    /// than from a running maximum (f32 only).
    differentiable: bool,
}

/// The output size of the pool along an axis of `n` values.
fn pooled(n: usize) -> usize {
    n.div_ceil(2)
}

/// The flat index (within a plane `h × w`) of each output's maximum, as PyTorch's CPU kernel:
/// scan the window clipped to the plane in row-major order, keep a value if it is greater
/// than the best so far or NaN; start from the window's first position.
fn argmax_plane<T: WithDType>(plane: &[T], h: usize, w: usize, out: &mut [u32]) {
    let wo = pooled(w);
    for (o, idx) in out.iter_mut().enumerate() {
        let (y, x) = (o / wo, o % wo);
        let ys = (2 * y).saturating_sub(1)..(2 * y + 2).min(h);
        let xs = (2 * x).saturating_sub(1)..(2 * x + 2).min(w);
        let mut best = ys.start * w + xs.start;
        let mut max = f64::NEG_INFINITY;
        for yy in ys {
            for xx in xs.clone() {
                let v = plane[yy * w + xx].to_f64();
                if v > max || v.is_nan() {
                    max = v;
                    best = yy * w + xx;
                }
            }
        }
        *idx = best as u32;
    }
}

impl MaxPool {
    /// Each output from its window's argmax, the position the backward routes to.
    fn forward_argmax<T: WithDType>(x: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (n, c, h, w) = dims;
        let plane_out = pooled(h) * pooled(w);
        let mut out = vec![T::from_f64(0.0); n * c * plane_out];
        out.par_chunks_mut(plane_out)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                let mut idx = vec![0u32; plane_out];
                argmax_plane(plane, h, w, &mut idx);
                for (o, &i) in o.iter_mut().zip(&idx) {
                    *o = plane[i as usize];
                }
            });
        out
    }

    fn backward<T: WithDType>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let plane_out = pooled(h) * pooled(w);
        let xv = host::<T>(x)?;
        let g = host::<T>(grad)?;
        if g.len() != n * c * plane_out {
            candle_core::bail!(
                "max pool backward: gradient {:?} for input {:?}",
                grad.dims(),
                x.dims()
            );
        }
        let mut gx = vec![T::from_f64(0.0); xv.len()];
        gx.par_chunks_mut(h * w)
            .zip(xv.par_chunks(h * w))
            .zip(g.par_chunks(plane_out))
            .for_each(|((d, plane), g)| {
                let mut idx = vec![0u32; plane_out];
                argmax_plane(plane, h, w, &mut idx);
                for (&i, &gv) in idx.iter().zip(g) {
                    d[i as usize] += gv;
                }
            });
        Tensor::from_vec(gx, (n, c, h, w), x.device())
    }

    /// A running maximum per window, in one parallel pass (Candle's pool has no padding, so
    /// it would need two padded copies first).
    fn forward_max(x: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
        let (ho, wo) = (pooled(h), pooled(w));
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
        out
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let dims = (n, c, h, w);
        let out = match s {
            CpuStorage::F32(_) if !self.differentiable => {
                CpuStorage::F32(Self::forward_max(slice(s, l)?, dims))
            }
            CpuStorage::F32(_) => CpuStorage::F32(Self::forward_argmax(slice::<f32>(s, l)?, dims)),
            CpuStorage::F64(_) => CpuStorage::F64(Self::forward_argmax(slice::<f64>(s, l)?, dims)),
            _ => candle_core::bail!("max pool op: f32 or f64 only"),
        };
        Ok((out, Shape::from((n, c, pooled(h), pooled(w)))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = match arg.dtype() {
            DType::F32 => Self::backward::<f32>(arg, grad)?,
            DType::F64 => Self::backward::<f64>(arg, grad)?,
            dt => candle_core::bail!("max pool with backward: {dt:?} is not supported"),
        };
        Ok(Some(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::Var;

    /// PyTorch's max pool, spelled out: for each output, the window clipped to the plane,
    /// scanned row by row; a value replaces the best if greater or NaN.
    fn brute_pool(x: &[f64], h: usize, w: usize) -> (Vec<f64>, Vec<usize>) {
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let mut vals = Vec::new();
        let mut idx = Vec::new();
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best: Option<(f64, usize)> = None;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let (y, xx) = ((2 * oy + dy) as i64 - 1, (2 * ox + dx) as i64 - 1);
                        if y < 0 || xx < 0 || y >= h as i64 || xx >= w as i64 {
                            continue;
                        }
                        let i = y as usize * w + xx as usize;
                        let v = x[i];
                        best = match best {
                            None => Some((v, i)),
                            Some((b, _)) if v > b || v.is_nan() => Some((v, i)),
                            keep => keep,
                        };
                    }
                }
                let (v, i) = best.unwrap();
                vals.push(v);
                idx.push(i);
            }
        }
        (vals, idx)
    }

    /// Small integers, so that windows hold ties; some −∞.
    fn tied_values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (s >> 33) % 7 {
                    6 => f64::NEG_INFINITY,
                    r => (r % 3) as f64 - 1.0,
                }
            })
            .collect()
    }

    fn pool_case(h: usize, w: usize, dtype: DType, values: Vec<f64>) {
        let dev = Device::Cpu;
        let (n, c) = (2, 3);
        let plane = h * w;
        let x = Var::from_tensor(
            &Tensor::from_vec(values.clone(), (n, c, h, w), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let y = max_pool_3x3_s2_p1(x.as_tensor()).unwrap();
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        assert_eq!(y.dims(), [n, c, ho, wo]);
        let g: Vec<f64> = (0..n * c * ho * wo).map(|i| 1.0 + i as f64).collect();
        let gt = Tensor::from_vec(g.clone(), y.shape(), &dev).unwrap();
        let loss = (y.to_dtype(DType::F64).unwrap() * &gt)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx = host::<f64>(grads.get(x.as_tensor()).unwrap()).unwrap();
        let ys = host::<f64>(&y).unwrap();
        for p in 0..n * c {
            let (vals, idx) = brute_pool(&values[p * plane..][..plane], h, w);
            let mut expected = vec![0.0; plane];
            for (o, &i) in idx.iter().enumerate() {
                expected[i] += g[p * ho * wo + o];
            }
            for (o, v) in vals.iter().enumerate() {
                let ours = ys[p * ho * wo + o];
                assert!(
                    ours == *v || ours.is_nan() && v.is_nan(),
                    "{h}x{w} plane {p} out {o}"
                );
            }
            assert_eq!(
                &gx[p * plane..][..plane],
                &expected[..],
                "{h}x{w} plane {p}"
            );
        }
    }

    #[test]
    fn max_pool_backward_matches_brute_force_with_ties_and_borders() {
        for (i, &(h, w)) in [
            (1, 1),
            (1, 4),
            (2, 3),
            (3, 3),
            (5, 4),
            (7, 7),
            (6, 9),
            (10, 5),
        ]
        .iter()
        .enumerate()
        {
            let values = tied_values(6 * h * w, i as u64);
            pool_case(h, w, DType::F64, values.clone());
            pool_case(h, w, DType::F32, values);
        }
        // All equal: every output takes the first position of its clipped window.
        pool_case(4, 4, DType::F64, vec![0.5; 6 * 16]);
        // NaN wins, the last one of a window.
        let mut values = tied_values(6 * 25, 99);
        values[3] = f64::NAN;
        values[7] = f64::NAN;
        values[30] = f64::NAN;
        pool_case(5, 5, DType::F64, values);
    }

    #[test]
    fn max_pool_forward_matches_the_inference_pool() {
        let x = Var::randn(0f32, 1.0, (2, 4, 9, 12), &Device::Cpu).unwrap();
        let ours = max_pool_3x3_s2_p1(x.as_tensor()).unwrap();
        let fast = max_pool_3x3_s2_p1(&x.as_tensor().detach()).unwrap();
        let d = (ours - fast).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
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

    /// Candle's ops (the GPU path): the same values and, without ties, the same gradients
    /// as the brute-force reference, on odd and even sizes.
    #[test]
    fn candle_ops_pool_matches_brute_force() {
        use crate::kernels::{scoped, Kernels};
        for (i, &(h, w)) in [(1, 1), (2, 3), (5, 4), (7, 7), (6, 9)].iter().enumerate() {
            // Distinct values: a permutation of 0..n scaled, so that no window has a tie.
            let n = 6 * h * w;
            let values: Vec<f64> = (0..n)
                .map(|j| ((j * 7919 + i * 13) % n) as f64 - 3.0)
                .collect();
            scoped(Kernels::Candle, || {
                pool_case(h, w, DType::F32, values.clone())
            });
        }
    }
}
