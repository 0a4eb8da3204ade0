//! Reading COCO JSON: ground-truth documents and results files, with Python's non-finite
//! tokens accepted so that the offending entry can be named.

use std::path::Path;

use serde::{de, Deserialize, Deserializer};

use super::{check_box, Category, Detection, EvalError, GroundTruth, GtBox};

impl GroundTruth {
    /// Parses a COCO ground-truth document (`images`, `annotations`, `categories`). An
    /// annotation without `area` gets `w * h`; `iscrowd` and `ignore` default to 0.
    pub fn from_json_str(text: &str) -> Result<Self, EvalError> {
        Self::parse(text, "ground truth")
    }

    /// Reads and parses a COCO ground-truth file; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, EvalError> {
        let path = path.as_ref();
        let text = read_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, what: &str) -> Result<Self, EvalError> {
        let raw: RawGroundTruth = parse_json(text, what)?;
        if raw.categories.is_empty() {
            return Err(EvalError::Incomplete {
                what: what.to_string(),
                message: "`categories` is empty: there is nothing to evaluate".into(),
            });
        }
        let annotations = raw
            .annotations
            .into_iter()
            .enumerate()
            .map(|(index, a)| a.into_gt_box(index))
            .collect::<Result<Vec<_>, _>>()?;
        let categories = raw
            .categories
            .into_iter()
            .map(|c| Category {
                id: c.id,
                name: c.name.unwrap_or_default(),
            })
            .collect();
        Self::new(
            raw.images.into_iter().map(|i| i.id),
            categories,
            annotations,
        )
    }
}

/// Parses a COCO results document: `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`.
/// Python's `NaN`/`Infinity` tokens are accepted here and reported as non-finite numbers.
pub fn detections_from_json_str(text: &str) -> Result<Vec<Detection>, EvalError> {
    parse_detections(text, "detections")
}

/// Reads and parses a COCO results file; errors name the file.
pub fn detections_from_json_file(path: impl AsRef<Path>) -> Result<Vec<Detection>, EvalError> {
    let path = path.as_ref();
    let text = read_file(path)?;
    parse_detections(&text, &path.display().to_string())
}

fn parse_detections(text: &str, what: &str) -> Result<Vec<Detection>, EvalError> {
    let raw: Vec<RawDetection> = parse_json(text, what)?;
    raw.into_iter()
        .enumerate()
        .map(|(index, d)| d.into_detection(index))
        .collect()
}

fn read_file(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Parses JSON; if that fails and the text holds Python's non-finite tokens, retries with them
/// turned into `null` so that the offending entry can be named.
fn parse_json<T: de::DeserializeOwned>(text: &str, what: &str) -> Result<T, EvalError> {
    serde_json::from_str(text).or_else(|error| {
        nulls_for_non_finite(text)
            .and_then(|fixed| serde_json::from_str(&fixed).ok())
            .ok_or_else(|| EvalError::Json {
                what: what.to_string(),
                error,
            })
    })
}

/// Replaces `NaN`, `Infinity` and `-Infinity` outside strings by `null`; `None` if there are none.
fn nulls_for_non_finite(text: &str) -> Option<String> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied) = (0, 0);
    let (mut in_string, mut escaped) = (false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| bytes[i..].starts_with(t.as_bytes())) {
            out.push_str(&text[copied..i]);
            out.push_str("null");
            i += token.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

#[derive(Deserialize)]
struct RawGroundTruth {
    images: Vec<RawImage>,
    /// Required: without it every detection would count as a false positive, with exit 0.
    annotations: Vec<RawAnnotation>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: Vec<Option<f64>>,
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: Flag,
    #[serde(default)]
    ignore: Flag,
}

impl RawAnnotation {
    fn into_gt_box(self, index: usize) -> Result<GtBox, EvalError> {
        let bbox = box_from_json(&self.bbox, "annotation", index)?;
        Ok(GtBox {
            id: self.id,
            image_id: self.image_id,
            category_id: self.category_id,
            bbox,
            area: self.area.unwrap_or(bbox[2] * bbox[3]),
            iscrowd: self.iscrowd.0,
            ignore: self.ignore.0,
        })
    }
}

#[derive(Deserialize)]
struct RawDetection {
    image_id: i64,
    category_id: i64,
    bbox: Vec<Option<f64>>,
    // Required but nullable: a missing score is a parse error, a null one a non-finite score.
    #[serde(deserialize_with = "nullable_f64")]
    score: Option<f64>,
}

impl RawDetection {
    fn into_detection(self, index: usize) -> Result<Detection, EvalError> {
        let bbox = box_from_json(&self.bbox, "detection", index)?;
        let score = self.score.unwrap_or(f64::NAN);
        if !score.is_finite() {
            return Err(EvalError::InvalidScore { index, score });
        }
        Ok(Detection::new(self.image_id, self.category_id, bbox, score))
    }
}

fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

/// A COCO 0/1 flag, accepted as a number or a boolean; any non-zero number is true, like
/// pycocotools' truth test.
#[derive(Clone, Copy, Default)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl de::Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("0, 1 or a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flag, E> {
                Ok(Flag(v != 0))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flag, E> {
                Ok(Flag(v != 0))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Flag, E> {
                Ok(Flag(v != 0.0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Flag, E> {
                Ok(Flag(false))
            }
        }
        d.deserialize_any(FlagVisitor)
    }
}

/// Converts a JSON box; nulls (from NaN/Infinity tokens) become NaN and fail the box check.
fn box_from_json(
    values: &[Option<f64>],
    what: &'static str,
    index: usize,
) -> Result<[f64; 4], EvalError> {
    let bbox: [Option<f64>; 4] = values.try_into().map_err(|_| EvalError::InvalidBox {
        what,
        index,
        reason: format!("expected 4 numbers [x, y, w, h], got {}", values.len()),
    })?;
    let bbox = bbox.map(|v| v.unwrap_or(f64::NAN));
    check_box(&bbox, what, index)?;
    Ok(bbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_become_null() {
        let s = r#"[{"a": NaN, "b": "NaN", "c": -Infinity, "d": Infinity}]"#;
        let fixed = nulls_for_non_finite(s).unwrap();
        assert_eq!(fixed, r#"[{"a": null, "b": "NaN", "c": null, "d": null}]"#);
        assert!(nulls_for_non_finite(r#"{"x": "NaN"}"#).is_none());
    }
}
