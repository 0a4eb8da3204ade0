//! Parity of `retinanet::eval` with pycocotools' `COCOeval(..., "bbox")`.
//!
//! The fixtures come from `scripts/make_eval_fixtures.py` (pycocotools itself computes the
//! expected numbers); they live in `$RETINANET_FIXTURES/eval`, by default
//! `<crate>/target/fixtures/eval`. A missing directory fails the test rather than skipping it.

use std::path::{Path, PathBuf};

use retinanet::eval::{
    detections_from_json_file, detections_from_json_str, evaluate, format_summary, Category,
    Detection, EvalError, GroundTruth, GtBox, Summary,
};
use serde::Deserialize;

/// Absolute tolerance against pycocotools' numbers.
const TOL: f64 = 1e-9;
/// The script writes 14 random cases plus the public fake100 one.
const MIN_CASES: usize = 15;

#[derive(Deserialize)]
struct Expected {
    stats: Summary,
    per_class: Vec<ExpectedClass>,
    summary_lines: Vec<String>,
    recall_shape: Vec<usize>,
    recall: Vec<f64>,
    precision_shape: Vec<usize>,
    #[serde(default)]
    precision: Option<Vec<f64>>,
    exact: Exact,
}

/// Stats and per-class APs as Python repr strings: parsed here with Rust's correctly rounded
/// parser, so the comparison does not depend on serde_json's float parsing.
#[derive(Deserialize)]
struct Exact {
    stats: Vec<String>,
    per_class_ap: Vec<String>,
    per_class_ap50: Vec<String>,
}

fn parse_exact(values: &[String]) -> Vec<f64> {
    values
        .iter()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("bad number {v:?}: {e}"))
        })
        .collect()
}

#[derive(Deserialize)]
struct ExpectedClass {
    category_id: i64,
    ap: f64,
    ap50: f64,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures_dir() -> PathBuf {
    std::env::var_os("RETINANET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target").join("fixtures"))
        .join("eval")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// Case names, from the `expected_<name>.json` files.
fn case_names(dir: &Path) -> Vec<String> {
    assert!(
        dir.is_dir(),
        "COCO evaluation fixtures not found in {0}: generate them from the repository root with \
         `\"$(bash scripts/venv.sh)\" scripts/make_eval_fixtures.py {0}` (pycocotools computes \
         the expected numbers; RETINANET_FIXTURES=DIR makes the tests read DIR/eval)",
        dir.display()
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let case = name.strip_prefix("expected_")?.strip_suffix(".json")?;
            Some(case.to_string())
        })
        .collect();
    names.sort();
    names
}

/// Tracks the largest deviations and collects readable mismatches.
#[derive(Default)]
struct Diffs {
    /// Largest deviation of the stats and per-class APs (compared exactly).
    max_scalar: f64,
    /// Largest deviation in the recall and precision arrays (read through serde_json).
    max_array: f64,
    scalars: usize,
    identical_scalars: usize,
    failures: Vec<String>,
}

impl Diffs {
    fn record(&mut self, what: impl Fn() -> String, got: f64, want: f64) -> f64 {
        let diff = (got - want).abs();
        if diff > TOL || got.is_nan() != want.is_nan() {
            self.failures
                .push(format!("{}: got {got}, pycocotools {want}", what()));
        }
        diff
    }

    fn check(&mut self, what: impl Fn() -> String, got: f64, want: f64) {
        let diff = self.record(what, got, want);
        self.max_scalar = self.max_scalar.max(diff);
        self.scalars += 1;
        self.identical_scalars += usize::from(got.to_bits() == want.to_bits());
    }

    fn check_array(&mut self, case: &str, name: &str, got: &[f64], want: &[f64]) {
        if got.len() != want.len() {
            self.failures.push(format!(
                "{case}: {name} has {} values, pycocotools {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let mut bad = 0;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let before = self.failures.len();
            let diff = self.record(|| format!("{case}: {name}[{i}]"), g, w);
            self.max_array = self.max_array.max(diff);
            if self.failures.len() > before {
                bad += 1;
                if bad > 5 {
                    self.failures.pop();
                }
            }
        }
    }
}

fn check_case(dir: &Path, case: &str, diffs: &mut Diffs) {
    let gt = GroundTruth::from_json_file(dir.join(format!("gt_{case}.json")))
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let dets = detections_from_json_file(dir.join(format!("dets_{case}.json")))
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let expected: Expected = read_json(&dir.join(format!("expected_{case}.json")));
    let eval = evaluate(&gt, &dets).unwrap_or_else(|e| panic!("{case}: {e}"));

    let got = eval.summary().values();
    let want = parse_exact(&expected.exact.stats);
    assert_eq!(want.len(), 12, "{case}: stats");
    for ((name, &g), &w) in Summary::NAMES.iter().zip(&got).zip(&want) {
        diffs.check(|| format!("{case}: {name}"), g, w);
    }
    // The plain JSON numbers must say the same (up to serde_json's parsing).
    for (&w, n) in want.iter().zip(expected.stats.values()) {
        assert!((w - n).abs() < 1e-15, "{case}: inconsistent expected file");
    }
    let classes = eval.per_class();
    assert_eq!(
        classes.len(),
        expected.per_class.len(),
        "{case}: categories"
    );
    let aps = parse_exact(&expected.exact.per_class_ap);
    let ap50s = parse_exact(&expected.exact.per_class_ap50);
    for (((c, e), &ap), &ap50) in classes
        .iter()
        .zip(&expected.per_class)
        .zip(&aps)
        .zip(&ap50s)
    {
        assert_eq!(c.category_id, e.category_id, "{case}: category order");
        assert!(
            (ap - e.ap).abs() < 1e-15 && (ap50 - e.ap50).abs() < 1e-15,
            "{case}"
        );
        diffs.check(
            || format!("{case}: AP of category {}", e.category_id),
            c.ap,
            ap,
        );
        diffs.check(
            || format!("{case}: AP50 of category {}", e.category_id),
            c.ap50,
            ap50,
        );
    }
    assert_eq!(
        eval.recall_shape().to_vec(),
        expected.recall_shape,
        "{case}"
    );
    assert_eq!(
        eval.precision_shape().to_vec(),
        expected.precision_shape,
        "{case}"
    );
    diffs.check_array(case, "recall", eval.recall(), &expected.recall);
    if let Some(precision) = &expected.precision {
        diffs.check_array(case, "precision", eval.precision(), precision);
    }
    let printed = format_summary(eval.summary());
    for (got, want) in printed.lines().zip(&expected.summary_lines) {
        if got != want {
            diffs
                .failures
                .push(format!("{case}: printed {got:?}, pycocotools {want:?}"));
        }
    }
    if printed.lines().count() != expected.summary_lines.len() {
        diffs.failures.push(format!("{case}: printed line count"));
    }
}

#[test]
fn matches_pycocotools_on_generated_fixtures() {
    let dir = fixtures_dir();
    let mut names = case_names(&dir);
    assert!(
        names.len() >= MIN_CASES,
        "only {} cases in {}; regenerate with scripts/make_eval_fixtures.py",
        names.len(),
        dir.display()
    );
    let mut diffs = Diffs::default();
    for case in &names {
        check_case(&dir, case, &mut diffs);
    }
    // The optional speed case (`--bench`) is checked too when it has been generated.
    let bench = dir.join("bench");
    if bench.join("expected_bench.json").is_file() {
        check_case(&bench, "bench", &mut diffs);
        names.push("bench".to_string());
    }
    println!(
        "{} cases ({}): stats and per-class AP max abs diff {:e} ({} of {} bit-identical); \
         recall/precision arrays max abs diff {:e}",
        names.len(),
        names.join(", "),
        diffs.max_scalar,
        diffs.identical_scalars,
        diffs.scalars,
        diffs.max_array
    );
    assert!(
        diffs.failures.is_empty(),
        "differences from pycocotools:\n{}",
        diffs.failures.join("\n")
    );
}

#[test]
fn matches_published_fake100_numbers() {
    let dir = manifest_dir()
        .join("..")
        .join("shared")
        .join("data")
        .join("coco-eval-fake100");
    assert!(
        dir.is_dir(),
        "{} is missing: the shared data directory must sit beside the repository",
        dir.display()
    );
    let gt = GroundTruth::from_json_file(dir.join("gt.json")).unwrap();
    let dets = detections_from_json_file(dir.join("dets.json")).unwrap();
    // expected.json holds pycocotools' 12 bbox numbers under the same keys as `Summary`.
    let expected: Summary = read_json(&dir.join("expected.json"));
    let eval = evaluate(&gt, &dets).unwrap();
    let mut diffs = Diffs::default();
    let got = eval.summary().values();
    for ((name, g), w) in Summary::NAMES.iter().zip(got).zip(expected.values()) {
        diffs.check(|| format!("fake100: {name}"), g, w);
    }
    println!(
        "fake100 published numbers: max abs diff {:e}",
        diffs.max_scalar
    );
    assert!(diffs.failures.is_empty(), "{}", diffs.failures.join("\n"));
}

fn tiny_gt() -> GroundTruth {
    let cats = vec![
        Category {
            id: 1,
            name: "cat".into(),
        },
        Category {
            id: 2,
            name: "dog".into(),
        },
    ];
    let anns = vec![GtBox::new(5, 7, 1, [0.0, 0.0, 10.0, 10.0])];
    GroundTruth::new([7, 8], cats, anns).unwrap()
}

fn error_of(dets: &[Detection]) -> String {
    evaluate(&tiny_gt(), dets)
        .expect_err("bad detections must be rejected")
        .to_string()
}

#[test]
fn unknown_image_is_named() {
    let dets = [
        Detection::new(7, 1, [0.0, 0.0, 1.0, 1.0], 0.5),
        Detection::new(4242, 1, [0.0, 0.0, 1.0, 1.0], 0.5),
    ];
    let msg = error_of(&dets);
    assert!(msg.contains("4242") && msg.contains("detection 1"), "{msg}");
}

#[test]
fn unknown_category_is_named() {
    let dets = [Detection::new(8, 99, [0.0, 0.0, 1.0, 1.0], 0.5)];
    let err = evaluate(&tiny_gt(), &dets).unwrap_err();
    assert!(matches!(
        err,
        EvalError::UnknownCategory {
            index: 0,
            category_id: 99
        }
    ));
    let msg = err.to_string();
    assert!(msg.contains("99") && msg.contains("detection 0"), "{msg}");
}

#[test]
fn nan_score_is_rejected() {
    let dets = [
        Detection::new(7, 1, [0.0, 0.0, 1.0, 1.0], 0.5),
        Detection::new(7, 1, [0.0, 0.0, 1.0, 1.0], 0.4),
        Detection::new(7, 1, [0.0, 0.0, 1.0, 1.0], f64::NAN),
    ];
    let msg = error_of(&dets);
    assert!(msg.contains("detection 2") && msg.contains("NaN"), "{msg}");
    // Python's json.dump writes NaN for a NaN score.
    let json = r#"[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": NaN}]"#;
    let msg = detections_from_json_str(json).unwrap_err().to_string();
    assert!(
        msg.contains("detection 0") && msg.contains("score"),
        "{msg}"
    );
    let json = r#"[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": Infinity}]"#;
    assert!(detections_from_json_str(json).is_err());
}

#[test]
fn malformed_boxes_are_rejected() {
    let short = r#"[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1},
                    {"image_id": 7, "category_id": 1, "bbox": [0, 0, 1], "score": 0.2}]"#;
    let msg = detections_from_json_str(short).unwrap_err().to_string();
    assert!(
        msg.contains("detection 1") && msg.contains("got 3"),
        "{msg}"
    );
    let negative = [Detection::new(7, 1, [0.0, 0.0, -3.0, 1.0], 0.5)];
    let msg = error_of(&negative);
    assert!(msg.contains("detection 0") && msg.contains("-3"), "{msg}");
    let infinite =
        r#"[{"image_id": 7, "category_id": 1, "bbox": [0, Infinity, 1, 1], "score": 0.1}]"#;
    let msg = detections_from_json_str(infinite).unwrap_err().to_string();
    assert!(
        msg.contains("detection 0") && msg.contains("not a finite"),
        "{msg}"
    );
    let gt = r#"{"images": [{"id": 1}], "categories": [{"id": 1}],
                 "annotations": [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4, 5]}]}"#;
    let msg = GroundTruth::from_json_str(gt).unwrap_err().to_string();
    assert!(
        msg.contains("annotation 0") && msg.contains("got 5"),
        "{msg}"
    );
}

#[test]
fn file_errors_name_the_file() {
    let missing = manifest_dir().join("no-such-dir").join("dets.json");
    let msg = detections_from_json_file(&missing).unwrap_err().to_string();
    assert!(msg.contains("no-such-dir"), "{msg}");
}
