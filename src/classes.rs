//! Class names.

use std::path::Path;

use crate::{Error, Result};

/// COCO class names in torchvision's 91-index order: the index is the COCO category id;
/// `__background__` and `N/A` fill the unused ids.
pub const COCO_91: [&str; 91] = [
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// Whether a name is a placeholder for an unused class index.
pub fn is_placeholder(name: &str) -> bool {
    name == "N/A" || name == "__background__"
}

/// Reads class names from a file: a JSON array of strings, or one name per line.
pub fn read_file(path: &Path) -> Result<Vec<String>> {
    let invalid = |what: &str| Error::Invalid(format!("{}: {what}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|_| invalid("not a JSON array of strings"));
    }
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    if names.iter().all(|n| n.trim().is_empty()) {
        return Err(invalid("no class names"));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_files_are_json_arrays_or_lines() {
        let dir = std::env::temp_dir().join(format!("retinanet-classes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            read_file(&path)
        };
        assert_eq!(read("a.json", r#"["x", "y"]"#).unwrap(), ["x", "y"]);
        assert_eq!(read("b.txt", "x\r\ny z\n").unwrap(), ["x", "y z"]);
        assert!(read("c.json", "[1]").is_err());
        assert!(read("d.txt", "\n \n").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
