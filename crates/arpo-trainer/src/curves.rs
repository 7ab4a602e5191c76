//! `training_curves.png` and `.svg`: reward, success rate, replay size and loss per epoch.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::TrainerError;
use crate::metrics::MetricsHistory;

/// Draws the four panels into `<dir>/training_curves.png` and `<dir>/training_curves.svg`.
pub fn draw(metrics: &MetricsHistory, dir: &Path) -> Result<(), TrainerError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    let png = dir.join("training_curves.png");
    let svg = dir.join("training_curves.svg");
    {
        let root = BitMapBackend::new(&png, (1000, 700)).into_drawing_area();
        panels(&root, metrics).map_err(|e| TrainerError::io(&png, e))?;
        root.present().map_err(|e| TrainerError::io(&png, e))?;
    }
    {
        let root = SVGBackend::new(&svg, (1000, 700)).into_drawing_area();
        panels(&root, metrics).map_err(|e| TrainerError::io(&svg, e))?;
        root.present().map_err(|e| TrainerError::io(&svg, e))?;
    }
    Ok(())
}

type Series = (
    &'static str,
    fn(&crate::metrics::EpochMetrics) -> f64,
    RGBColor,
);

fn panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &MetricsHistory,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((2, 2));
    let series: [Series; 4] = [
        ("average reward", |e| e.avg_reward, BLUE),
        ("success rate", |e| e.success_rate, GREEN),
        ("replay buffer size", |e| e.replay_size as f64, MAGENTA),
        ("loss", |e| e.loss, RED),
    ];
    for (area, (title, f, colour)) in areas.iter().zip(series) {
        let points: Vec<(f64, f64)> = metrics
            .epochs
            .iter()
            .map(|e| (e.epoch as f64 + 1.0, f(e)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max) + 0.5;
        let (mut y_min, mut y_max) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        let pad = ((y_max - y_min) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.5..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
