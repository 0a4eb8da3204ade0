//! Winograd's minimal filtering for 3×3 stride-1 convolutions (Lavin and Gray, 2016):
//! F(2×2, 3×3) and F(4×4, 3×3): the transformed weights and the input and output transforms.

use std::ops::Range;

use rayon::prelude::*;

use super::host::SyncPtr;

/// Floats of Winograd scratch (transformed inputs and products) per band, about 8 MB: the
/// products re-pack their weight operand per call, so bands need a few hundred tiles.
pub(super) const WINOGRAD_BAND_FLOATS: usize = 2 * 1024 * 1024;

/// A Winograd algorithm F(m×m, 3×3): tile size t = m + 2 and its transforms.
#[derive(Debug)]
pub(super) struct Spec {
    pub(super) t: usize,
    /// Kernel transform G, t × 3 (the input and output transforms are written out in `bt`
    /// and `at`).
    g: &'static [f64],
}

/// F(2×2, 3×3): 2.25× fewer multiplications than direct, and as accurate.
pub(super) const F2: Spec = Spec {
    t: 4,
    g: &[1., 0., 0., 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0., 0., 1.],
};

/// F(4×4, 3×3) on the points 0, ±1, ±2 (Lavin and Gray): 4× fewer multiplications; its
/// transforms cost a little precision (about 1e-6 relative per layer).
pub(super) const F4: Spec = Spec {
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
pub(super) struct Winograd {
    pub(super) spec: &'static Spec,
    /// U = G·g·Gᵀ, `[t²][cout][cin]`.
    pub(super) u: Vec<f32>,
}

impl Winograd {
    pub(super) fn new(spec: &'static Spec, w: &[f32], cout: usize, cin: usize) -> Self {
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

/// Geometry of the tiles over a padded image.
pub(super) struct TileGrid {
    pub(super) hp: usize,
    pub(super) wp: usize,
    /// Tiles per row.
    pub(super) tw: usize,
    /// Output size.
    pub(super) h: usize,
    pub(super) w: usize,
}

/// Bᵀ·d for one column d of a tile: F(2×2, 3×3) for T = 4, F(4×4, 3×3) for T = 6.
#[inline(always)]
pub(super) fn bt<const T: usize>(d: [f32; T]) -> [f32; T] {
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
pub(super) fn at<const T: usize, const M: usize>(m: [f32; T]) -> [f32; M] {
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

/// V = Bᵀ·d·B for the `n` `tiles` of every channel of the padded planes `x`, into `v` laid
/// out `[T²][cin][n]`.
pub(super) fn winograd_input<const T: usize, const M: usize>(
    x: &[f32],
    grid: &TileGrid,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    if T == 4 {
        // F(2×2)'s transforms are a few additions: gathering into lanes costs more.
        return winograd_input_per_tile::<T, M>(x, grid, tiles, v);
    }
    let (hp, wp) = (grid.hp, grid.wp);
    let (cin, t0, n) = (x.len() / (hp * wp), tiles.start, tiles.len());
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
    grid: &TileGrid,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    let (hp, wp) = (grid.hp, grid.wp);
    let (cin, t0, n) = (x.len() / (hp * wp), tiles.start, tiles.len());
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
pub(super) const LANES: usize = 16;
