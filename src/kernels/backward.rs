//! Gradients of a convolution from its output gradient: the input gradient of a strided
//! convolution (a product scattered back by col2im), the weight gradient (products with
//! im2col bands, or Winograd F(2×2, 3×3) for 3×3 stride-1 kernels) and per-channel sums.
//! The stride-1 input gradient is a forward convolution with the flipped kernel.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::direct::BAND_FLOATS;
use super::host::SyncPtr;
use super::im2col::{im2col, Geometry};
use super::matmul::matmul;
use super::winograd::bt;

/// `(n, cin, cout, h, w, ho, wo)`.
pub(crate) type ConvDims = (usize, usize, usize, usize, usize, usize, usize);

/// Rows of a `(cout, …)` array times a per-row factor.
pub(crate) fn scale_rows(w: &[f32], scale: &[f32]) -> Vec<f32> {
    let mut out = w.to_vec();
    scale_rows_in_place(&mut out, scale);
    out
}

pub(crate) fn scale_rows_in_place(w: &mut [f32], scale: &[f32]) {
    let row = w.len() / scale.len();
    w.par_chunks_mut(row)
        .zip(scale.par_iter())
        .for_each(|(r, &s)| r.iter_mut().for_each(|v| *v *= s));
}

/// Per-channel sums of an `(n, c, plane)` gradient, accumulated in f64, channels in
/// parallel (each summed in a fixed order).
pub(crate) fn channel_sums(g: &[f32], c: usize, plane: usize) -> Vec<f32> {
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
pub(crate) fn grad_input_strided(g: &[f32], w: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
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
            matmul(
                (kk, q, cout),
                ((cols.as_mut_ptr(), 1, q), false),
                (w.as_ptr(), kk, 1),
                (g_img.as_ptr(), 1, q),
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
pub(crate) fn grad_weight(g: &[f32], x: &[f32], geo: Geometry, d: ConvDims) -> Vec<f32> {
    let (n, cin, cout, _, _, ho, wo) = d;
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
    let out = SyncPtr(total.as_mut_ptr());
    (0..cin.div_ceil(cb)).into_par_iter().for_each(|b| {
        let channels = b * cb..(b * cb + cb).min(cin);
        let rows = channels.len() * kt;
        let nb = if pointwise {
            q
        } else {
            (BAND_FLOATS / rows).clamp(64, 4096).min(q)
        };
        let bands = (0..n).flat_map(|img| (0..q).step_by(nb).map(move |q0| (img, q0)));
        // SAFETY: the destination is the cout × rows block at column c0·k·k of the cout × kk
        // gradient (rows kk apart), written by this thread only.
        unsafe {
            let dst = out.at(channels.start * kt);
            accumulate_bands(&geo, d, (g, x), channels, nb, bands, dst)
        };
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
    let channel = |data, c, channels| ChannelTiles {
        data,
        c,
        channels,
        h,
        w,
    };
    let total = n * h.div_ceil(2) * w.div_ceil(2);
    for j0 in (0..total).step_by(chunk) {
        let len = chunk.min(total - j0);
        let (v, gy) = (
            &mut v[..tile_block(len) * cin],
            &mut gy[..tile_block(len) * cout],
        );
        v.par_chunks_mut(tile_block(len))
            .enumerate()
            .for_each(|(c, dst)| input_tiles(channel(x, c, cin), (j0, len), dst));
        gy.par_chunks_mut(tile_block(len))
            .enumerate()
            .for_each(|(c, dst)| gradient_tiles(channel(g, c, cout), (j0, len), dst));
        let rs = tile_block(len);
        s.par_chunks_mut(cout * cin)
            .enumerate()
            .for_each(|(xi, s_xi)| {
                // SAFETY: S_ξ is cout × cin (rows cin apart); Ŷ_ξ is cout × len and V_ξ is
                // cin × len (rows `tile_block(len)` apart, from ξ·(len | 1)), read transposed.
                unsafe {
                    matmul(
                        (cout, cin, len),
                        ((s_xi.as_mut_ptr(), 1, cin), j0 > 0),
                        (gy[xi * (len | 1)..].as_ptr(), 1, rs),
                        (v[xi * (len | 1)..].as_ptr(), rs, 1),
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

/// Channel `c` of an `(n, channels, h, w)` map, tiled 2×2.
#[derive(Clone, Copy)]
struct ChannelTiles<'a> {
    data: &'a [f32],
    c: usize,
    channels: usize,
    h: usize,
    w: usize,
}

impl ChannelTiles<'_> {
    /// The channel's plane in image `img`.
    fn plane(&self, img: usize) -> &[f32] {
        let hw = self.h * self.w;
        &self.data[(img * self.channels + self.c) * hw..][..hw]
    }

    /// Tiles per image.
    fn tiles(&self) -> usize {
        self.h.div_ceil(2) * self.w.div_ceil(2)
    }
}

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
fn input_tiles(x: ChannelTiles, chunk: (usize, usize), dst: &mut [f32]) {
    let ld = chunk.1 | 1;
    let tw = x.w.div_ceil(2);
    let wp = 2 * tw + 2;
    let mut rows = vec![0f32; 4 * wp];
    let mut e = vec![0f32; 4 * wp];
    tile_rows(chunk, x.tiles(), tw, |img, ty, tx0, j, n_tx| {
        // Input rows 2·ty − 1 … 2·ty + 2, one column of padding on the left.
        padded_rows(x.plane(img), x.w, ((2 * ty) as isize - 1, 1), wp, &mut rows);
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
fn gradient_tiles(g: ChannelTiles, chunk: (usize, usize), dst: &mut [f32]) {
    let ld = chunk.1 | 1;
    let tw = g.w.div_ceil(2);
    let wp = 2 * tw;
    let mut rows = vec![0f32; 2 * wp];
    let mut col = vec![0f32; wp];
    tile_rows(chunk, g.tiles(), tw, |img, ty, tx0, j, n_tx| {
        padded_rows(g.plane(img), g.w, ((2 * ty) as isize, 0), wp, &mut rows);
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

/// `dst += Σ g_img[:, band] · columns(band)ᵀ` over the bands of `nb` output positions from
/// `(image, q0)` in `bands`, in order: their weight-gradient contribution for the input
/// `channels` (`rows` = channels·k·k gradient columns). A 1×1 stride-1 convolution reads its
/// columns straight from the input (rows q apart); anything else copies them into an im2col
/// band.
///
/// # Safety
/// `dst` must point at a `cout × rows` block whose rows are `cin·k·k` apart, written by no
/// other thread meanwhile.
unsafe fn accumulate_bands(
    geo: &Geometry,
    d: ConvDims,
    (g, x): (&[f32], &[f32]),
    channels: Range<usize>,
    nb: usize,
    bands: impl Iterator<Item = (usize, usize)>,
    dst: *mut f32,
) {
    let (_, cin, cout, h, w, ho, wo) = d;
    let (kt, q) = (geo.k * geo.k, ho * wo);
    let rows = channels.len() * kt;
    let pointwise = geo.k == 1 && geo.stride == 1 && geo.padding == 0;
    let mut cols = vec![0f32; if pointwise { 0 } else { rows * nb }];
    for (img, q0) in bands {
        let len = nb.min(q - q0);
        let input = &x[(img * cin + channels.start) * h * w..(img * cin + channels.end) * h * w];
        let (cols, cols_rs): (&[f32], usize) = if pointwise {
            (&input[q0..], q)
        } else {
            let cols = &mut cols[..rows * len];
            im2col(geo, input, h, w, q0, len, cols);
            (cols, len)
        };
        let g_img = &g[img * cout * q + q0..];
        matmul(
            (cout, rows, len),
            ((dst, 1, cin * kt), true),
            (g_img.as_ptr(), 1, q),
            (cols.as_ptr(), cols_rs, 1),
            Parallelism::None,
        );
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
    let (n, cin, cout, _, _, ho, wo) = d;
    let kk = cin * geo.k * geo.k;
    let q = ho * wo;
    let nb = (BAND_FLOATS / (cout + kk)).clamp(64, 2048);
    let per_image = q.div_ceil(nb);
    let jobs = n * per_image;
    // A fixed split of the work, summed in order: the result does not depend on the thread
    // count or on scheduling, so training runs (and resumes) are reproducible.
    let chunks = jobs.min(GRAD_CHUNKS);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cout * kk];
            let bands = (c * jobs / chunks..(c + 1) * jobs / chunks)
                .map(|job| (job / per_image, job % per_image * nb));
            // SAFETY: acc is cout × kk, owned by this chunk.
            unsafe { accumulate_bands(&geo, d, (g, x), 0..cin, nb, bands, acc.as_mut_ptr()) };
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
    use candle_core::{Device, Tensor};

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
}
