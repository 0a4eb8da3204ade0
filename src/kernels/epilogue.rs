//! The write-back of a convolution's products: bias, residual and ReLU applied as each band
//! (or each Winograd tile, after its output transform) is stored.

use std::ops::Range;

use super::host::SyncPtr;
use super::winograd::{at, TileGrid, LANES};

/// Writes `relu?(acc + bias + residual)` for a band to the output planes.
pub(super) struct Epilogue<'a> {
    pub(super) out: SyncPtr,
    pub(super) bias: &'a [f32],
    pub(super) plane: usize,
    pub(super) wo: usize,
    pub(super) relu: bool,
}

impl Epilogue<'_> {
    /// `pos(j)` maps band column j to its position in an output plane, or `None` for scratch.
    pub(super) fn write(&self, acc: &[f32], nb: usize, pos: impl Fn(usize) -> Option<usize>) {
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
    /// Y = Aᵀ·M·A for every (cout, tile) of a band of `tiles`, then bias, residual and ReLU.
    pub(super) fn write_winograd<const T: usize, const M: usize>(
        &self,
        m: &[f32],
        tiles: Range<usize>,
        grid: &TileGrid,
    ) {
        if T == 4 {
            return self.write_winograd_per_tile::<T, M>(m, tiles, grid);
        }
        let (cout, t0, n) = (self.bias.len(), tiles.start, tiles.len());
        for (co, &b) in self.bias.iter().enumerate() {
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
        tiles: Range<usize>,
        grid: &TileGrid,
    ) {
        let (cout, t0, n) = (self.bias.len(), tiles.start, tiles.len());
        for (co, &b) in self.bias.iter().enumerate() {
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
