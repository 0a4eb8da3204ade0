//! Anchor generation (§4, "Anchors"): 3 scales × 3 aspect ratios per location on P3–P7, as
//! torchvision's `AnchorGenerator` with RetinaNet's defaults.
//!
//! Anchors are computed on the host (they depend only on the padded batch size and the
//! feature-map sizes) in f32, with torchvision's rounding, ordering and strides.

/// Anchor sizes and aspect ratios per pyramid level.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorGenerator {
    /// Anchor sizes (square roots of areas, in pixels) per level.
    pub sizes: Vec<Vec<f32>>,
    /// Aspect ratios h/w, shared by all levels.
    pub aspect_ratios: Vec<f32>,
    cell_anchors: Vec<Vec<[f32; 4]>>,
}

impl Default for AnchorGenerator {
    /// RetinaNet's anchors: sizes (x, ⌊x·2^⅓⌋, ⌊x·2^⅔⌋) for x = 32…512 on P3…P7, ratios ½, 1, 2.
    fn default() -> Self {
        let sizes = [32.0f64, 64.0, 128.0, 256.0, 512.0]
            .iter()
            .map(|&x| {
                // torchvision truncates with int(): (32, 40, 50), (64, 80, 101), …
                vec![
                    x as f32,
                    (x * 2f64.powf(1.0 / 3.0)).trunc() as f32,
                    (x * 2f64.powf(2.0 / 3.0)).trunc() as f32,
                ]
            })
            .collect();
        Self::new(sizes, vec![0.5, 1.0, 2.0])
    }
}

impl AnchorGenerator {
    /// A generator with the given sizes per level and aspect ratios.
    pub fn new(sizes: Vec<Vec<f32>>, aspect_ratios: Vec<f32>) -> Self {
        let cell_anchors = sizes
            .iter()
            .map(|s| base_anchors(s, &aspect_ratios))
            .collect();
        Self {
            sizes,
            aspect_ratios,
            cell_anchors,
        }
    }

    /// Anchors per feature-map location (A), assuming the same count on every level.
    pub fn num_anchors_per_location(&self) -> usize {
        self.cell_anchors.first().map_or(0, Vec::len)
    }

    /// Zero-centred anchors of one location of `level`, ratio-major, `[x1, y1, x2, y2]`.
    pub fn cell_anchors(&self, level: usize) -> &[[f32; 4]] {
        &self.cell_anchors[level]
    }

    /// Strides `(y, x)` of each level: padded size // feature size, as torchvision.
    pub fn strides(padded: (usize, usize), grid_sizes: &[(usize, usize)]) -> Vec<(usize, usize)> {
        grid_sizes
            .iter()
            .map(|&(h, w)| (padded.0 / h, padded.1 / w))
            .collect()
    }

    /// All anchors for a batch padded to `padded` `(H, W)` with feature maps of `grid_sizes`
    /// `(h, w)`, level after level, location-major (row-major) then anchor.
    pub fn generate(&self, padded: (usize, usize), grid_sizes: &[(usize, usize)]) -> Vec<[f32; 4]> {
        let strides = Self::strides(padded, grid_sizes);
        let total: usize = grid_sizes
            .iter()
            .zip(&self.cell_anchors)
            .map(|(&(h, w), c)| h * w * c.len())
            .sum();
        let mut out = Vec::with_capacity(total);
        for ((&(h, w), &(sy, sx)), cell) in grid_sizes.iter().zip(&strides).zip(&self.cell_anchors)
        {
            for i in 0..h {
                let y = (i * sy) as f32;
                for j in 0..w {
                    let x = (j * sx) as f32;
                    out.extend(
                        cell.iter()
                            .map(|a| [x + a[0], y + a[1], x + a[2], y + a[3]]),
                    );
                }
            }
        }
        out
    }
}

/// torchvision's `generate_anchors`, in f32: for each ratio, for each size,
/// `round([-w, -h, w, h] / 2)` with w = size / √ratio, h = size · √ratio.
fn base_anchors(sizes: &[f32], aspect_ratios: &[f32]) -> Vec<[f32; 4]> {
    let mut out = Vec::with_capacity(sizes.len() * aspect_ratios.len());
    for &ratio in aspect_ratios {
        let h_ratio = ratio.sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &size in sizes {
            let (w, h) = (w_ratio * size, h_ratio * size);
            // torch.round rounds half to even (50.5 → 50).
            out.push([-w, -h, w, h].map(|v| (v / 2.0).round_ties_even()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes_are_truncated_like_torchvision() {
        let g = AnchorGenerator::default();
        assert_eq!(g.sizes[0], vec![32.0, 40.0, 50.0]);
        assert_eq!(g.sizes[1], vec![64.0, 80.0, 101.0]);
        assert_eq!(g.sizes[4], vec![512.0, 645.0, 812.0]);
        assert_eq!(g.num_anchors_per_location(), 9);
    }

    #[test]
    fn base_anchors_round_half_to_even() {
        let g = AnchorGenerator::default();
        // Ratio 1, size 101 → ±50.5 → ±50 (half to even), not ±51.
        assert_eq!(g.cell_anchors(1)[5], [-50.0, -50.0, 50.0, 50.0]);
        // Ratio 1, size 50 → ±25.
        assert_eq!(g.cell_anchors(0)[5], [-25.0, -25.0, 25.0, 25.0]);
    }

    #[test]
    fn strides_follow_padded_size() {
        let s = AnchorGenerator::strides((800, 1088), &[(100, 136), (13, 17), (7, 9)]);
        assert_eq!(s, vec![(8, 8), (61, 64), (114, 120)]);
    }
}
