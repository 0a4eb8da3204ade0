//! pycocotools' `accumulate` and `summarize`: precision and recall along the ranked
//! detections, interpolated at the recall thresholds, and the twelve summary numbers.

use super::matching::{sort_by_score_desc, CellEval, DetFlags};
use super::results::Summary;
use super::{iou_index, AreaRange, A, M, R, T};

/// Accumulated precision and recall of one (category, area, maxDets) setting.
pub(super) struct Accumulated {
    recall: [f64; T],
    precision: [[f64; R]; T],
}

/// pycocotools' `accumulate` for one category and `maxDets` value, at every area range;
/// `None` where there is no non-ignored ground truth (left at −1).
pub(super) fn accumulate(
    cells: &[CellEval],
    max_det: usize,
    recall_thr: &[f64; R],
) -> [Option<Box<Accumulated>>; A] {
    // Concatenate in image order, then one stable sort: numpy's mergesort tie order.
    let mut entries: Vec<(f64, u32, u32)> = Vec::new();
    for (c, cell) in cells.iter().enumerate() {
        for (d, &s) in cell.scores.iter().take(max_det).enumerate() {
            entries.push((s, c as u32, d as u32));
        }
    }
    sort_by_score_desc(&mut entries, |e| e.0);
    std::array::from_fn(|a| {
        let npig: usize = cells.iter().map(|c| c.areas[a].npig).sum();
        if npig == 0 {
            return None;
        }
        let flags: Vec<DetFlags> = entries
            .iter()
            .map(|&(_, c, d)| cells[c as usize].areas[a].flags[d as usize])
            .collect();
        Some(Box::new(precision_recall(&flags, npig, recall_thr)))
    })
}

/// Cumulative TP/FP along the ranked detections, then interpolated precision and final recall.
fn precision_recall(flags: &[DetFlags], npig: usize, recall_thr: &[f64; R]) -> Accumulated {
    let mut out = Accumulated {
        recall: [0.0; T],
        precision: [[0.0; R]; T],
    };
    let mut rc = Vec::with_capacity(flags.len());
    let mut pr = Vec::with_capacity(flags.len());
    for t in 0..T {
        let bit = 1u16 << t;
        rc.clear();
        pr.clear();
        let (mut tp, mut fp) = (0usize, 0usize);
        for f in flags {
            tp += usize::from(f.tp & bit != 0);
            fp += usize::from(f.fp & bit != 0);
            let (tpf, fpf) = (tp as f64, fp as f64);
            rc.push(tpf / npig as f64);
            pr.push(tpf / (fpf + tpf + f64::EPSILON));
        }
        out.recall[t] = rc.last().copied().unwrap_or(0.0);
        interpolate(&rc, &mut pr, recall_thr, &mut out.precision[t]);
    }
    out
}

/// Makes precision non-increasing from the right, then samples it at the first rank whose
/// recall reaches each threshold (`np.searchsorted(rc, recThrs, side='left')`); thresholds
/// beyond the final recall keep 0.
fn interpolate(rc: &[f64], pr: &mut [f64], recall_thr: &[f64; R], out: &mut [f64; R]) {
    for i in (1..pr.len()).rev() {
        if pr[i] > pr[i - 1] {
            pr[i - 1] = pr[i];
        }
    }
    for (q, &thr) in out.iter_mut().zip(recall_thr) {
        let pos = rc.partition_point(|&x| x < thr);
        match pr.get(pos) {
            Some(&p) => *q = p,
            None => break,
        }
    }
}

/// Lays the per-(k, m) results out as pycocotools' precision [T,R,K,A,M] and recall [T,K,A,M].
pub(super) fn assemble(
    k_len: usize,
    jobs: &[(usize, usize)],
    results: &[[Option<Box<Accumulated>>; A]],
) -> (Vec<f64>, Vec<f64>) {
    let mut precision = vec![-1.0; T * R * k_len * A * M];
    let mut recall = vec![-1.0; T * k_len * A * M];
    for (&(k, m), per_area) in jobs.iter().zip(results) {
        for (a, acc) in per_area.iter().enumerate() {
            let Some(acc) = acc else { continue };
            for t in 0..T {
                recall[((t * k_len + k) * A + a) * M + m] = acc.recall[t];
                for r in 0..R {
                    precision[(((t * R + r) * k_len + k) * A + a) * M + m] = acc.precision[t][r];
                }
            }
        }
    }
    (precision, recall)
}

/// pycocotools' `_summarizeDets`.
pub(super) fn summarize(precision: &[f64], recall: &[f64], k_len: usize) -> Summary {
    let ap = |t: Option<usize>, area: AreaRange, m: usize| {
        let ts = t.map_or(0..T, |t| t..t + 1);
        let a = area.index();
        // C order of precision[t, :, :, a, m]: t, then r, then k.
        let values = ts.flat_map(|t| {
            (0..R).flat_map(move |r| {
                (0..k_len).map(move |k| (((t * R + r) * k_len + k) * A + a) * M + m)
            })
        });
        mean_valid(values.map(|i| precision[i]))
    };
    let ar = |area: AreaRange, m: usize| {
        let a = area.index();
        let values =
            (0..T).flat_map(|t| (0..k_len).map(move |k| ((t * k_len + k) * A + a) * M + m));
        mean_valid(values.map(|i| recall[i]))
    };
    // pycocotools looks the thresholds up by exact equality, which holds for 0.5 and 0.75.
    let t50 = iou_index(0.5);
    let t75 = iou_index(0.75);
    let last = M - 1;
    Summary {
        ap: ap(None, AreaRange::All, last),
        ap50: t50.map_or(-1.0, |t| ap(Some(t), AreaRange::All, last)),
        ap75: t75.map_or(-1.0, |t| ap(Some(t), AreaRange::All, last)),
        ap_small: ap(None, AreaRange::Small, last),
        ap_medium: ap(None, AreaRange::Medium, last),
        ap_large: ap(None, AreaRange::Large, last),
        ar1: ar(AreaRange::All, 0),
        ar10: ar(AreaRange::All, 1),
        ar100: ar(AreaRange::All, last),
        ar_small: ar(AreaRange::Small, last),
        ar_medium: ar(AreaRange::Medium, last),
        ar_large: ar(AreaRange::Large, last),
    }
}

/// numpy's `np.mean(s[s > -1])`, or −1 when nothing is valid.
pub(super) fn mean_valid(values: impl Iterator<Item = f64>) -> f64 {
    let valid: Vec<f64> = values.filter(|&v| v > -1.0).collect();
    if valid.is_empty() {
        -1.0
    } else {
        pairwise_sum(&valid) / valid.len() as f64
    }
}

/// numpy's pairwise summation (`add.reduce` on a contiguous float64 array), so that the means
/// agree with pycocotools to the last bit.
fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, &v| s + v)
    } else if n <= BLOCK {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for chunk in a[8..full].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(chunk) {
                *acc += v;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        a[full..].iter().fold(head, |s, &v| s + v)
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_matches_plain_sum_closely() {
        let v: Vec<f64> = (0..1000).map(|i| (i as f64).sqrt()).collect();
        let plain: f64 = v.iter().sum();
        assert!((pairwise_sum(&v) - plain).abs() < 1e-9);
    }
}
