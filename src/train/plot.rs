//! The end-of-run plot: reward (and accuracy) and mean visual dependency
//! over optimizer steps, as a PNG next to `metrics.jsonl`.

use super::metrics::{StepMetrics, ValMetrics};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 700;

fn ensure_font() {
    // Bundled font: plots render the same on machines without system fonts.
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        let _ = register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        );
    });
}

fn series_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    (lo - pad, hi + pad)
}

/// Draws the curves into an RGB buffer.
fn draw(
    records: &[StepMetrics],
    val: &[ValMetrics],
    title: &str,
    buf: &mut [u8],
) -> Result<(), String> {
    ensure_font();
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(HEIGHT / 2 - 20);
    let steps = records.last().map_or(1, |r| r.step.max(1)) as f64;

    let mut reward = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..steps, 0.0..1.0)
        .map_err(|e| e.to_string())?;
    reward
        .configure_mesh()
        .y_desc("reward / accuracy")
        .draw()
        .map_err(|e| e.to_string())?;
    let line = |f: fn(&StepMetrics) -> f64| {
        records
            .iter()
            .map(move |r| (r.step as f64, f(r)))
            .collect::<Vec<_>>()
    };
    reward
        .draw_series(LineSeries::new(
            line(|r| r.reward_mean),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?
        .label("reward_mean")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    reward
        .draw_series(LineSeries::new(line(|r| r.accuracy), RED.stroke_width(1)))
        .map_err(|e| e.to_string())?
        .label("accuracy")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED));
    if !val.is_empty() {
        // Held-out accuracy: what the training curves cannot show.
        let points: Vec<(f64, f64)> = val.iter().map(|v| (v.step as f64, v.accuracy)).collect();
        reward
            .draw_series(LineSeries::new(points.clone(), BLACK.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("val/accuracy")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        reward
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, BLACK.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    reward
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;

    let dependency: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.visual_dependency_mean.map(|d| (r.step as f64, d)))
        .collect();
    let (lo, hi) = series_range(dependency.iter().map(|p| p.1));
    let mut dep = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..steps, lo..hi)
        .map_err(|e| e.to_string())?;
    dep.configure_mesh()
        .x_desc("optimizer step")
        .y_desc(if dependency.is_empty() {
            "visual dependency (not computed)"
        } else {
            "mean visual dependency"
        })
        .draw()
        .map_err(|e| e.to_string())?;
    dep.draw_series(LineSeries::new(dependency, GREEN.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes the plot to `path` (PNG; a temporary file, then renamed).
pub fn write_plot(
    records: &[StepMetrics],
    val: &[ValMetrics],
    title: &str,
    path: &Path,
) -> Result<(), String> {
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(records, val, title, &mut buf)?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf).ok_or("plot buffer size")?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
