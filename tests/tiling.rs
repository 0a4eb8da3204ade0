//! Tiled inference: a large image built from tiles gives the boxes of each tile run alone,
//! and overlapping tiles are merged without same-class duplicates.

mod common;

use candle_core::Device;
use image::RgbImage;
use retinanet::tiling::{detect_tiled, tile_grid, TileConfig};
use retinanet::{Detection, LoadOptions, RetinaNet, TransformConfig};

const TILE: u32 = 256;

/// The 7-class ResNet-18 fixture at a 256-pixel input, so 256-pixel tiles are not resized.
fn model() -> RetinaNet {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let opts = LoadOptions {
        transform: TransformConfig {
            min_size: TILE as usize,
            max_size: TILE as usize,
            ..Default::default()
        },
        ..Default::default()
    };
    RetinaNet::load_with(dir.join("v1_r18_k7/model.safetensors"), &Device::Cpu, &opts).unwrap()
}

fn photo(name: &str) -> RgbImage {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/photos")
        .join(name);
    image::open(&path).unwrap().to_rgb8()
}

/// Six different 256×256 crops of real photos.
fn tiles() -> Vec<RgbImage> {
    let crop = |img: &RgbImage, x, y| image::imageops::crop_imm(img, x, y, TILE, TILE).to_image();
    let (dog, person, astronaut) = (
        photo("darknet_dog.jpg"),
        photo("darknet_person.jpg"),
        photo("astronaut.png"),
    );
    vec![
        crop(&dog, 0, 0),
        crop(&dog, 300, 200),
        crop(&person, 100, 50),
        crop(&astronaut, 128, 0),
        crop(&astronaut, 0, 256),
        crop(&dog, 500, 300),
    ]
}

fn sorted(mut dets: Vec<Detection>) -> Vec<Detection> {
    dets.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.label.cmp(&b.label))
            .then(a.bbox.map(f32::to_bits).cmp(&b.bbox.map(f32::to_bits)))
    });
    dets
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

#[test]
fn a_mosaic_of_tiles_gives_the_boxes_of_each_tile_alone() {
    let model = model();
    let tiles = tiles();
    let (cols, rows) = (3u32, 2u32);
    let mut mosaic = RgbImage::new(cols * TILE, rows * TILE);
    let mut expected = Vec::new();
    for (i, tile) in tiles.iter().enumerate() {
        let (x, y) = ((i as u32 % cols) * TILE, (i as u32 / cols) * TILE);
        image::imageops::replace(&mut mosaic, tile, x as i64, y as i64);
        let alone = model.detect(tile).unwrap();
        assert!(!alone.is_empty());
        expected.extend(alone.into_iter().map(|mut d| {
            d.bbox = [
                d.bbox[0] + x as f32,
                d.bbox[1] + y as f32,
                d.bbox[2] + x as f32,
                d.bbox[3] + y as f32,
            ];
            d
        }));
    }
    let expected = sorted(expected);

    let one_by_one = detect_tiled(&model, &mosaic, &TileConfig::new(TILE, 0)).unwrap();
    assert_eq!(sorted(one_by_one), expected);

    // Batched tiles: same boxes up to float noise of the batched convolution.
    let batched = TileConfig {
        batch_size: 4,
        ..TileConfig::new(TILE, 0)
    };
    let got = sorted(detect_tiled(&model, &mosaic, &batched).unwrap());
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.label, e.label);
        assert!((g.score - e.score).abs() < 1e-4, "{g:?} vs {e:?}");
        for k in 0..4 {
            assert!((g.bbox[k] - e.bbox[k]).abs() < 1e-2, "{g:?} vs {e:?}");
        }
    }
}

#[test]
fn overlapping_tiles_are_merged_without_duplicates() {
    let model = model();
    let image = photo("darknet_dog.jpg"); // 768×576
    let config = TileConfig::new(TILE, 96);
    let grid = tile_grid(image.width(), image.height(), &config).unwrap();
    assert_eq!(grid.len(), 5 * 3); // x: 0, 160, 320, 480, 512; y: 0, 160, 320

    let mut per_tile = Vec::new();
    for t in &grid {
        let crop = image::imageops::crop_imm(&image, t.x, t.y, t.width, t.height).to_image();
        for mut d in model.detect(&crop).unwrap() {
            d.bbox = [
                d.bbox[0] + t.x as f32,
                d.bbox[1] + t.y as f32,
                d.bbox[2] + t.x as f32,
                d.bbox[3] + t.y as f32,
            ];
            per_tile.push(d);
        }
    }
    let merged = detect_tiled(&model, &image, &config).unwrap();
    assert!(
        !merged.is_empty() && merged.len() < per_tile.len(),
        "overlaps produce duplicates to merge"
    );
    for w in merged.windows(2) {
        assert!(w[0].score >= w[1].score, "best first");
    }
    for (i, a) in merged.iter().enumerate() {
        assert!(per_tile.contains(a), "{a:?} comes from a tile");
        assert!(a.bbox[2] <= image.width() as f32 && a.bbox[3] <= image.height() as f32);
        for b in &merged[i + 1..] {
            if a.label == b.label {
                // Degenerate boxes have IoU 0/0 = NaN, which NMS never suppresses.
                let v = iou(&a.bbox, &b.bbox);
                assert!(v.is_nan() || v <= 0.5 + 1e-4, "{a:?} and {b:?} overlap");
            }
        }
    }
    // Capped.
    let capped = TileConfig {
        max_detections: Some(5),
        ..config
    };
    assert_eq!(detect_tiled(&model, &image, &capped).unwrap(), merged[..5]);
}
