//! Line charts as PNG files, shared by the examples (`#[path = "common/plot.rs"] mod plot;`):
//! the frame and encoding, and the charts themselves (finetune's losses, evaluate's PR
//! curves), each example using its own.

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, Result};
use image::ImageEncoder as _;
use plotters::prelude::*;
use retinanet::eval::{iou_index, AreaRange, Evaluation, PrCurve};

/// A chart's frame: title, axis names and ranges, size in pixels.
pub struct Chart<'a> {
    /// Caption.
    pub title: &'a str,
    /// Name of the x axis.
    pub x_desc: &'a str,
    /// Name of the y axis.
    pub y_desc: &'a str,
    /// Shown x values.
    pub x_range: Range<f64>,
    /// Shown y values.
    pub y_range: Range<f64>,
    /// Width and height in pixels.
    pub size: (u32, u32),
}

/// A named series of (x, y) points and its colour.
pub type Curve = (String, Vec<(f64, f64)>, RGBColor);

/// Draws `curves` in `chart` with a legend and writes the PNG to `path` atomically.
pub fn write_png(chart: &Chart, curves: &[Curve], path: &Path) -> Result<()> {
    let (width, height) = chart.size;
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    // The `bitmap_backend` feature has no file encoder: render to RGB, encode with `image`.
    render(chart, curves, &mut pixels).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &pixels,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )?;
    retinanet::io::atomic::write_atomic(path, &png)?;
    Ok(())
}

fn render(
    chart: &Chart,
    curves: &[Curve],
    pixels: &mut [u8],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(pixels, chart.size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut frame = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(chart.x_range.clone(), chart.y_range.clone())?;
    frame
        .configure_mesh()
        .x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .draw()?;
    for (name, points, color) in curves {
        let style = color.stroke_width(2);
        frame
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    frame
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Loss curves (classification, box, total) over steps, as `loss.png` in `out`.
pub fn losses(records: &[serde_json::Value], out: &Path) -> retinanet::Result<()> {
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
            .collect()
    };
    let total = series("loss");
    let Some(&(max_step, _)) = total.last() else {
        return Ok(());
    };
    let chart = Chart {
        title: "Training loss (spikes clipped)",
        x_desc: "step",
        y_desc: "loss",
        x_range: 0.0..max_step.max(1.0),
        y_range: 0.0..y_limit(&total) * 1.05,
        size: (800, 500),
    };
    let curves = [
        ("total".to_string(), total, BLACK),
        ("classification".into(), series("classification"), BLUE),
        ("box regression".into(), series("box_regression"), RED),
    ];
    write_png(&chart, &curves, &out.join("loss.png"))
        .map_err(|e| retinanet::Error::Invalid(format!("{e:#}")))
}

/// An upper limit for the y axis: the largest value, but at most 4× the median, so that one
/// early spike does not flatten the rest of the curve.
fn y_limit(points: &[(f64, f64)]) -> f64 {
    let mut v: Vec<f64> = points
        .iter()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    let (Some(&median), Some(&max)) = (v.get(v.len() / 2), v.last()) else {
        return 1.0;
    };
    max.min(4.0 * median).max(1e-3)
}

/// Class-averaged PR curves at IoU 0.50 and 0.75, area all, maxDets 100, as a PNG.
pub fn pr_curves(eval: &Evaluation, path: &Path) -> Result<()> {
    let mut curves = Vec::new();
    for (threshold, color) in [(0.5, BLUE), (0.75, RED)] {
        let t = iou_index(threshold).ok_or_else(|| anyhow!("IoU threshold {threshold}"))?;
        if let Some(curve) = eval.mean_pr_curve(t, AreaRange::All, 100)? {
            curves.push(pr_curve(&curve, color));
        }
    }
    if curves.is_empty() {
        anyhow::bail!(
            "cannot plot {}: no category has ground truth",
            path.display()
        );
    }
    let chart = Chart {
        title: "Precision-recall (all categories averaged, area all, maxDets 100)",
        x_desc: "recall",
        y_desc: "precision",
        x_range: 0.0..1.0,
        y_range: 0.0..1.05,
        size: (800, 600),
    };
    write_png(&chart, &curves, path)
}

/// A PR curve as a plotted series, labelled with its IoU threshold and AP.
fn pr_curve(curve: &PrCurve, color: RGBColor) -> Curve {
    let points = curve
        .recall
        .iter()
        .copied()
        .zip(curve.precision.iter().copied());
    let ap = curve.precision.iter().sum::<f64>() / curve.precision.len() as f64;
    let label = format!("IoU={:.2} (AP {ap:.3})", curve.iou_threshold);
    (label, points.collect(), color)
}
