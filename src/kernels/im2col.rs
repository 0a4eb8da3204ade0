//! Data movement of the convolutions: im2col bands, tap-major weight packing and zero padding.

use rayon::prelude::*;

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

/// `(cout, cin, taps)` weights as `(taps, cout, cin)`, in parallel.
pub(super) fn pack_taps(w: &[f32], cout: usize, cin: usize, taps: usize) -> Vec<f32> {
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

/// Zero-pads each of `c` planes of `h × w` by `p` on every side.
pub(super) fn pad(x: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    pad_to(x, c, h, w, p, h + 2 * p, w + 2 * p)
}

/// Copies each of `c` planes of `h × w` to offset `(p, p)` of a zeroed `hp × wp` plane.
pub(super) fn pad_to(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    p: usize,
    hp: usize,
    wp: usize,
) -> Vec<f32> {
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
