#!/usr/bin/env python3
"""Writes COCO box-evaluation fixtures with pycocotools' results, for tests/eval_parity.rs.

Usage (from the repository root):
    "$(bash scripts/venv.sh)" scripts/make_eval_fixtures.py [OUT_DIR]          # default below
    "$(bash scripts/venv.sh)" scripts/make_eval_fixtures.py [OUT_DIR] --bench  # also the speed case

OUT_DIR defaults to $RETINANET_FIXTURES/eval, else <repo>/target/fixtures/eval (where
tests/eval_parity.rs looks). For each case NAME it writes gt_NAME.json, dets_NAME.json and
expected_NAME.json. The expected file holds pycocotools' 12 stats, the per-category AP and
AP50 (mean over valid entries of precision[:, :, k, 0, -1] and precision[0, :, k, 0, -1], -1 if
none), the printed summary lines, the recall array and, for small cases, the precision array
(flattened in C order, with their shapes); "exact" repeats the stats and per-category APs as
repr strings.

--bench writes a 5,000-image x 100-detection case into OUT_DIR/bench/ and prints how long
pycocotools' evaluate + accumulate + summarize take on it.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

PYCOCOTOOLS_VERSION = "2.0.11"
ROOT = Path(__file__).resolve().parent.parent
FAKE100 = ROOT.parent / "shared" / "data" / "coco-eval-fake100"
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
# Precision arrays larger than this are left out of the expected file to keep it small.
MAX_PRECISION_VALUES = 300_000

try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError:
    sys.exit("pycocotools is missing: run this with the python printed by `bash scripts/venv.sh`")


def check_version():
    found = version("pycocotools")
    if found != PYCOCOTOOLS_VERSION:
        sys.exit(f"pycocotools {found} found, {PYCOCOTOOLS_VERSION} required (scripts/requirements.txt)")


def coco_from_dict(dataset):
    """A COCO object from an in-memory dataset, without pycocotools' chatter."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_cocoeval(gt, dets):
    """pycocotools' bbox evaluation; returns the COCOeval object and its printed summary."""
    coco_gt = coco_from_dict(gt)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    lines = [l for l in out.getvalue().splitlines() if l.startswith(" Average")]
    return ev, lines


def expected_from(ev, lines):
    precision = ev.eval["precision"]
    per_class = []
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        v = p[p > -1]
        p50 = precision[0, :, k, 0, -1]
        v50 = p50[p50 > -1]
        per_class.append({
            "category_id": int(cat_id),
            "ap": float(np.mean(v)) if v.size else -1.0,
            "ap50": float(np.mean(v50)) if v50.size else -1.0,
        })
    expected = {
        "stats": {name: float(s) for name, s in zip(STAT_NAMES, ev.stats)},
        "per_class": per_class,
        "summary_lines": lines,
        "recall_shape": list(ev.eval["recall"].shape),
        "recall": [float(x) for x in ev.eval["recall"].ravel()],
        "precision_shape": list(precision.shape),
        # The same numbers as exact decimal strings (Python repr), for bit-level comparisons
        # that do not depend on the reader's float parsing.
        "exact": {
            "stats": [repr(float(s)) for s in ev.stats],
            "per_class_ap": [repr(c["ap"]) for c in per_class],
            "per_class_ap50": [repr(c["ap50"]) for c in per_class],
        },
    }
    if precision.size <= MAX_PRECISION_VALUES:
        expected["precision"] = [float(x) for x in precision.ravel()]
    return expected


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    tmp.replace(path)


def write_case(out, name, gt, dets):
    ev, lines = run_cocoeval(gt, dets)
    write_json(out / f"gt_{name}.json", gt)
    write_json(out / f"dets_{name}.json", dets)
    write_json(out / f"expected_{name}.json", expected_from(ev, lines))
    stats = ", ".join(f"{n}={s:.3f}" for n, s in zip(STAT_NAMES, ev.stats))
    print(f"{name}: {len(gt['images'])} images, {len(gt['annotations'])} gt, {len(dets)} dets: {stats}")
    return ev


# ---------------------------------------------------------------- random case generation


class Gen:
    """Random COCO-like ground truth and detections; every knob is a keyword argument."""

    def __init__(self, rng, n_images, cat_ids, *, gt_per_image=(0, 8), crowd_p=0.03,
                 empty_image_p=0.15, size_mode="mixed", decimals=2, score_decimals=None,
                 fp_per_image=(0, 6), dup_p=0.3, miss_p=0.2, wrong_cat_p=0.05,
                 mask_area_p=0.5, ignore_field_p=0.0, gt_id_start=1, image_size=640):
        self.rng = rng
        self.n_images = n_images
        self.cat_ids = list(cat_ids)
        self.gt_per_image = gt_per_image
        self.crowd_p = crowd_p
        self.empty_image_p = empty_image_p
        self.size_mode = size_mode
        self.decimals = decimals
        self.score_decimals = score_decimals
        self.fp_per_image = fp_per_image
        self.dup_p = dup_p
        self.miss_p = miss_p
        self.wrong_cat_p = wrong_cat_p
        self.mask_area_p = mask_area_p
        self.ignore_field_p = ignore_field_p
        self.gt_id_start = gt_id_start
        self.image_size = image_size

    def num(self, x):
        x = float(x)
        if self.decimals is None:
            return x
        if self.decimals == 0:
            return float(round(x))
        return round(x, self.decimals)

    def score(self):
        s = float(self.rng.random())
        if self.score_decimals is not None:
            s = round(s, self.score_decimals)
        return s

    def biased_score(self, good):
        s = float(self.rng.beta(5, 2) if good else self.rng.beta(2, 5))
        return round(s, self.score_decimals) if self.score_decimals is not None else s

    def box_size(self):
        mode = self.size_mode
        if mode == "mixed":
            mode = self.rng.choice(["tiny", "small", "medium", "large", "huge", "edge"],
                                   p=[0.08, 0.3, 0.3, 0.2, 0.07, 0.05])
        if mode == "tiny":
            return self.rng.uniform(0.2, 4), self.rng.uniform(0.2, 4)
        if mode == "small":
            return self.rng.uniform(4, 40), self.rng.uniform(4, 40)
        if mode == "medium":
            return self.rng.uniform(25, 110), self.rng.uniform(25, 110)
        if mode == "large":
            return self.rng.uniform(90, 400), self.rng.uniform(90, 400)
        if mode == "huge":
            return self.rng.uniform(400, 2000), self.rng.uniform(400, 2000)
        # Exactly on an area boundary (32x32 or 96x96, or a non-square with the same area).
        side = float(self.rng.choice([32.0, 96.0]))
        return (side, side) if self.rng.random() < 0.5 else (side * 2, side / 2)

    def gt_box(self):
        w, h = self.box_size()
        x = self.rng.uniform(0, self.image_size)
        y = self.rng.uniform(0, self.image_size)
        return [self.num(x), self.num(y), self.num(w), self.num(h)]

    def jitter(self, box, scale):
        x, y, w, h = box
        dx, dy = self.rng.normal(0, scale * max(w, 1), 2)
        sw, sh = np.exp(self.rng.normal(0, scale, 2))
        return [self.num(x + dx), self.num(y + dy), self.num(max(w * sw, 0)), self.num(max(h * sh, 0))]

    def make(self):
        rng = self.rng
        image_ids = sorted(rng.choice(np.arange(1, 10 * self.n_images + 10), self.n_images, replace=False).tolist())
        images = [{"id": int(i), "width": self.image_size, "height": self.image_size} for i in image_ids]
        rng.shuffle(images)
        cats = [{"id": int(c), "name": f"class_{c}", "supercategory": "thing"} for c in self.cat_ids]
        rng.shuffle(cats)
        anns, dets = [], []
        next_id = self.gt_id_start
        for img in image_ids:
            n_gt = 0 if rng.random() < self.empty_image_p else int(rng.integers(*self.gt_per_image, endpoint=True))
            for _ in range(n_gt):
                box = self.gt_box()
                crowd = int(rng.random() < self.crowd_p)
                area = box[2] * box[3]
                if rng.random() < self.mask_area_p:
                    area = area * float(rng.uniform(0.4, 1.0))
                ann = {"id": next_id, "image_id": int(img), "category_id": int(rng.choice(self.cat_ids)),
                       "bbox": box, "area": area, "iscrowd": crowd, "segmentation": []}
                if self.ignore_field_p and rng.random() < self.ignore_field_p:
                    ann["ignore"] = int(rng.integers(0, 2))
                next_id += 1
                anns.append(ann)
                dets.extend(self.dets_for(ann))
            for _ in range(int(rng.integers(*self.fp_per_image, endpoint=True))):
                dets.append({"image_id": int(img), "category_id": int(rng.choice(self.cat_ids)),
                             "bbox": self.gt_box(), "score": self.score()})
        rng.shuffle(dets)
        gt = {"info": {"description": "random fixture"}, "images": images, "annotations": anns,
              "categories": cats}
        return gt, dets

    def dets_for(self, ann):
        out = []
        if self.rng.random() < self.miss_p:
            return out
        n = 1 + int(self.rng.random() < self.dup_p) + int(self.rng.random() < self.dup_p / 3)
        for _ in range(n):
            cat = ann["category_id"]
            if self.rng.random() < self.wrong_cat_p:
                cat = int(self.rng.choice(self.cat_ids))
            scale = float(self.rng.choice([0.01, 0.03, 0.06, 0.15, 0.4]))
            # Better-placed boxes tend to score higher, as with a real detector.
            score = self.score() if self.rng.random() < 0.3 else self.biased_score(scale < 0.1)
            out.append({"image_id": ann["image_id"], "category_id": cat,
                        "bbox": self.jitter(ann["bbox"], scale), "score": score})
        return out


def case_integer_ties(rng):
    """Integer boxes on a small grid and scores from a few values: exact IoU and score ties."""
    g = Gen(rng, 60, [1, 2, 3], decimals=0, score_decimals=1, size_mode="small", mask_area_p=0.0,
            crowd_p=0.05, dup_p=0.6)
    gt, dets = g.make()
    # Add boxes with IoU exactly on thresholds: 10x10 gt against 10xh detections.
    extra_img = gt["images"][0]["id"]
    next_id = max(a["id"] for a in gt["annotations"]) + 1
    for j, h in enumerate([5, 6, 7, 7.5, 8, 9, 10]):
        x = 1000.0 + 20 * j
        gt["annotations"].append({"id": next_id + j, "image_id": extra_img, "category_id": 1,
                                  "bbox": [x, 0.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0})
        for s in (0.5, 0.5):
            dets.append({"image_id": extra_img, "category_id": 1, "bbox": [x, 0.0, 10.0, float(h)], "score": s})
    return gt, dets


def bb_iou(d, g):
    """pycocotools' bbIou (maskApi.c) for one non-crowd pair, with the same double operations."""
    w = min(d[2] + d[0], g[2] + g[0]) - max(d[0], g[0])
    h = min(d[3] + d[1], g[3] + g[1]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    i = w * h
    return i / (d[2] * d[3] + g[2] * g[3] - i)


def case_iou_near_ties(rng):
    """Detections whose IoU (as computed in double) equals an IoU threshold exactly or misses it
    by a few ulps, on either side: sensitive to the exact threshold values and comparisons."""
    thresholds = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
    found = []  # (gt box, det box)
    for t in thresholds:
        kinds = {"equal": 0, "below": 0, "above": 0}
        for _ in range(20000):
            if min(kinds.values()) >= 2:
                break
            x, y = round(float(rng.uniform(0, 500)), 2), round(float(rng.uniform(0, 500)), 2)
            gw, gh = round(float(rng.uniform(20, 200)), 2), round(float(rng.uniform(20, 200)), 2)
            dw = round(float(t) * gw + float(rng.integers(-2, 3)) / 100, 2)
            g, d = [x, y, gw, gh], [x, y, dw, gh]
            iou = bb_iou(d, g)
            kind = "equal" if iou == t else "below" if 0 < t - iou < 1e-12 else \
                "above" if 0 < iou - t < 1e-12 else None
            if kind and kinds[kind] < 2:
                kinds[kind] += 1
                found.append((g, d))
    images, anns, dets = [], [], []
    for n, (g, d) in enumerate(found):
        images.append({"id": n + 1})
        anns.append({"id": n + 1, "image_id": n + 1, "category_id": 1, "bbox": g, "area": g[2] * g[3],
                     "iscrowd": 0})
        dets.append({"image_id": n + 1, "category_id": 1, "bbox": d, "score": round(float(rng.random()), 3)})
        # An unmatched false positive per image keeps precision below 1.
        dets.append({"image_id": n + 1, "category_id": 1, "bbox": [900.0, 900.0, 10.0, 10.0],
                     "score": round(float(rng.random()), 3)})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    return gt, dets


def case_zero_ids(rng):
    """Annotation ids from 0 and random `ignore` fields: pycocotools counts a match with gt id 0
    as unmatched and overwrites `ignore` with `iscrowd`."""
    g = Gen(rng, 60, [1, 2], gt_id_start=0, ignore_field_p=0.5, crowd_p=0.1)
    gt, dets = g.make()
    first = next(a for a in gt["annotations"] if a["id"] == 0)
    first["iscrowd"] = 0
    dets.append({"image_id": first["image_id"], "category_id": first["category_id"],
                 "bbox": list(first["bbox"]), "score": 0.999})
    return gt, dets


def case_many_dets(rng):
    """Images with 150-300 detections, most in one category: maxDets truncation and ranking."""
    g = Gen(rng, 30, [1, 2], gt_per_image=(5, 40), fp_per_image=(100, 250), score_decimals=3,
            empty_image_p=0.1)
    return g.make()


def case_empty_things(rng):
    """Images without gt (some with detections), a category without detections, a category
    without gt but with detections, a category with neither, an image with nothing at all."""
    g = Gen(rng, 40, [1, 2, 3], empty_image_p=0.4, crowd_p=0.08)
    gt, dets = g.make()
    gt["categories"].append({"id": 7, "name": "no_gt_with_dets"})
    gt["categories"].append({"id": 8, "name": "nothing"})
    gt["categories"].append({"id": 9, "name": "gt_without_dets"})
    dets = [d for d in dets if d["category_id"] != 2]
    ids = [im["id"] for im in gt["images"]]
    for _ in range(15):
        dets.append({"image_id": int(rng.choice(ids)), "category_id": 7,
                     "bbox": g.gt_box(), "score": g.score()})
    next_id = max(a["id"] for a in gt["annotations"]) + 1
    for j in range(5):
        gt["annotations"].append({"id": next_id + j, "image_id": int(rng.choice(ids)), "category_id": 9,
                                  "bbox": g.gt_box(), "area": 500.0, "iscrowd": 0})
    gt["images"].append({"id": 999999, "width": 10, "height": 10})
    return gt, dets


def case_all_crowd_small(rng):
    """A case where the only ground truth of some ranges is crowd: ranges with -1 stats."""
    g = Gen(rng, 25, [4, 5], size_mode="medium", crowd_p=0.5, fp_per_image=(0, 3))
    return g.make()


def cases(rng):
    yield "basic", Gen(rng, 20, [1, 2, 3]).make()
    yield "crowds", Gen(rng, 50, [1, 2, 4, 6], crowd_p=0.25, gt_per_image=(1, 10)).make()
    yield "integer_ties", case_integer_ties(rng)
    yield "many_dets", case_many_dets(rng)
    yield "area_edges", Gen(rng, 80, [1, 2], size_mode="edge", mask_area_p=0.0, score_decimals=2).make()
    yield "sizes", Gen(rng, 120, [1, 2, 3, 4], crowd_p=0.05, mask_area_p=0.7).make()
    yield "empty_things", case_empty_things(rng)
    yield "crowd_only_ranges", case_all_crowd_small(rng)
    yield "zero_ids_ignore_field", case_zero_ids(rng)
    yield "iou_near_ties", case_iou_near_ties(rng)
    yield "full_precision", Gen(rng, 80, [2, 3, 5], decimals=None, crowd_p=0.05).make()
    yield "single_class", Gen(rng, 200, [1], gt_per_image=(0, 30), fp_per_image=(0, 20), score_decimals=2).make()
    yield "moderate_a", Gen(rng, 300, list(range(1, 11)), gt_per_image=(0, 15), crowd_p=0.03).make()
    yield "moderate_b", Gen(rng, 400, [c * 3 for c in range(1, 21)], gt_per_image=(0, 12),
                            crowd_p=0.04, decimals=None, score_decimals=3).make()


def fake100_case(out):
    """The public cocoapi fake-detection case: check pycocotools against its published numbers."""
    gt = json.loads((FAKE100 / "gt.json").read_text())
    dets = json.loads((FAKE100 / "dets.json").read_text())
    published = json.loads((FAKE100 / "expected.json").read_text())
    ev = write_case(out, "fake100", gt, dets)
    worst = max(abs(published[n] - s) for n, s in zip(STAT_NAMES, ev.stats))
    if worst > 1e-12:
        sys.exit(f"pycocotools disagrees with {FAKE100 / 'expected.json'} by {worst}")


def bench(out, rng):
    """5,000 images x 100 detections over 80 categories; times pycocotools."""
    bench_dir = out / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    g = Gen(rng, 5000, list(range(1, 81)), gt_per_image=(1, 14), fp_per_image=(0, 0), empty_image_p=0.0,
            crowd_p=0.01)
    gt, _ = g.make()
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    dets = []
    for im in sorted(im["id"] for im in gt["images"]):
        anns = by_image.get(im, [])
        img_dets = [d for ann in anns for d in g.dets_for(ann)[:2]][:100]
        # Fill up to 100 with false positives, mostly in the image's own categories as a detector would.
        own = sorted({a["category_id"] for a in anns}) or g.cat_ids
        while len(img_dets) < 100:
            cats = own if rng.random() < 0.7 else g.cat_ids
            img_dets.append({"image_id": im, "category_id": int(rng.choice(cats)), "bbox": g.gt_box(),
                             "score": g.score()})
        dets.extend(img_dets)
    write_json(bench_dir / "gt_bench.json", gt)
    write_json(bench_dir / "dets_bench.json", dets)
    coco_gt = coco_from_dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
    out_text = io.StringIO()
    with contextlib.redirect_stdout(out_text):
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        t0 = time.perf_counter()
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        seconds = time.perf_counter() - t0
    lines = [l for l in out_text.getvalue().splitlines() if l.startswith(" Average")]
    write_json(bench_dir / "expected_bench.json", expected_from(ev, lines))
    print("\n".join(lines))
    print(f"bench: {len(gt['images'])} images, {len(gt['annotations'])} gt, {len(dets)} dets")
    print(f"pycocotools evaluate+accumulate+summarize: {seconds:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Same default as tests/eval_parity.rs: $RETINANET_FIXTURES/eval, else <repo>/target/fixtures/eval.
    env = os.environ.get("RETINANET_FIXTURES")
    base = Path(env) if env else ROOT / "target" / "fixtures"
    parser.add_argument("out", nargs="?", default=str(base / "eval"),
                        help="output directory (default: $RETINANET_FIXTURES/eval, else <repo>/target/fixtures/eval)")
    parser.add_argument("--bench", action="store_true", help="also write and time the 5,000-image case")
    parser.add_argument("--seed", type=int, default=20240607)
    args = parser.parse_args()
    check_version()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for name, (gt, dets) in cases(rng):
        write_case(out, name, gt, dets)
    if not FAKE100.is_dir():
        sys.exit(f"{FAKE100} is missing (the shared data directory beside the repository)")
    fake100_case(out)
    if args.bench:
        bench(out, np.random.default_rng(args.seed + 1))


if __name__ == "__main__":
    main()
