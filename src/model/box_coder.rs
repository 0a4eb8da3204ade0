//! Box coding (§4, "Box Regression Subnet": the R-CNN parameterisation of a box relative to
//! its anchor): anchors + deltas (dx, dy, dw, dh) ↔ boxes, as torchvision's `BoxCoder`
//! (weights (1, 1, 1, 1), widths x2 − x1 without +1, dw and dh clamped at ln(1000/16)).

/// Encodes and decodes boxes relative to anchors. Computations are in f32, in torchvision's
/// order of operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// Weights dividing (dx, dy, dw, dh).
    pub weights: [f32; 4],
    /// Upper clamp on dw and dh before `exp`.
    pub clip: f32,
}

impl Default for BoxCoder {
    fn default() -> Self {
        Self {
            weights: [1.0; 4],
            clip: (1000.0f64 / 16.0).ln() as f32,
        }
    }
}

impl BoxCoder {
    /// Applies `deltas` to `anchor`, giving `[x1, y1, x2, y2]`.
    pub fn decode(&self, deltas: [f32; 4], anchor: [f32; 4]) -> [f32; 4] {
        let width = anchor[2] - anchor[0];
        let height = anchor[3] - anchor[1];
        let ctr_x = anchor[0] + 0.5 * width;
        let ctr_y = anchor[1] + 0.5 * height;
        let [wx, wy, ww, wh] = self.weights;
        let dx = deltas[0] / wx;
        let dy = deltas[1] / wy;
        let dw = (deltas[2] / ww).min(self.clip);
        let dh = (deltas[3] / wh).min(self.clip);
        let pred_ctr_x = dx * width + ctr_x;
        let pred_ctr_y = dy * height + ctr_y;
        let half_w = 0.5 * (dw.exp() * width);
        let half_h = 0.5 * (dh.exp() * height);
        [
            pred_ctr_x - half_w,
            pred_ctr_y - half_h,
            pred_ctr_x + half_w,
            pred_ctr_y + half_h,
        ]
    }

    /// The deltas that take `anchor` to `gt` (the regression target in training).
    pub fn encode(&self, gt: [f32; 4], anchor: [f32; 4]) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let ex_w = anchor[2] - anchor[0];
        let ex_h = anchor[3] - anchor[1];
        let ex_x = anchor[0] + 0.5 * ex_w;
        let ex_y = anchor[1] + 0.5 * ex_h;
        let gt_w = gt[2] - gt[0];
        let gt_h = gt[3] - gt[1];
        let gt_x = gt[0] + 0.5 * gt_w;
        let gt_y = gt[1] + 0.5 * gt_h;
        [
            wx * (gt_x - ex_x) / ex_w,
            wy * (gt_y - ex_y) / ex_h,
            ww * (gt_w / ex_w).ln(),
            wh * (gt_h / ex_h).ln(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_is_identity() {
        let coder = BoxCoder::default();
        let anchor = [10.0, 20.0, 74.0, 52.0];
        let gt = [12.5, 18.0, 80.0, 60.25];
        let back = coder.decode(coder.encode(gt, anchor), anchor);
        for (a, b) in back.iter().zip(gt) {
            assert!((a - b).abs() < 1e-4, "{back:?} vs {gt:?}");
        }
    }

    #[test]
    fn large_deltas_are_clamped() {
        let coder = BoxCoder::default();
        let b = coder.decode([0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 16.0, 16.0]);
        // exp(ln(1000/16)) · 16 = 1000.
        assert!((b[2] - b[0] - 1000.0).abs() < 1e-2, "{b:?}");
    }
}
