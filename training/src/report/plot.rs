//! Line charts drawn with plotters, once on its SVG backend and once on its bitmap backend.
//!
//! Text is laid out (and, in PNGs, rasterised) with ab_glyph from DejaVu Sans embedded in the
//! binary by the `dejavu` crate, so rendering needs no system fonts. SVGs name the
//! `sans-serif` family and leave the glyphs to the viewer.

use std::io::Cursor;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::series::DashedLineSeries;
use plotters::style::{register_font, FontStyle};

use super::Report;

pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 720;
const FONT: &str = "sans-serif";

/// Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), then greys.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(80, 80, 80),
    RGBColor(140, 86, 75),
];

pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legend {
    UpperRight,
    LowerRight,
}

#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry (none for series whose colour another entry already explains).
    pub label: Option<String>,
    pub colour: usize,
    pub dashed: bool,
    pub markers: bool,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    /// Extra legend entries explaining line styles: (label, dashed), drawn in grey.
    pub styles: Vec<(String, bool)>,
    /// Label only integer x values (epochs).
    pub integer_x: bool,
    /// Format x labels as 12k / 1.2M (parameter counts).
    pub count_x: bool,
    /// Start the y axis at zero (losses) instead of near the data (accuracies).
    pub y_from_zero: bool,
    /// Clamp the y axis to [0, 1].
    pub unit_y: bool,
    pub legend: Legend,
}

fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + Clone + '_ {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

fn padded(lo: f64, hi: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    let pad = ((hi - lo) * frac).max(min_pad);
    (lo - pad, hi + pad)
}

impl Chart {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| finite(&s.points)).collect();
        let fold = |f: fn(&(f64, f64)) -> f64| {
            pts.iter()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                })
        };
        let (x, y) = (fold(|p| p.0), fold(|p| p.1));
        if pts.is_empty() {
            return ((0.0, 1.0), (0.0, 1.0));
        }
        let x = if self.integer_x {
            (x.0 - 0.25, x.1 + 0.25)
        } else {
            padded(x.0, x.1, 0.04, x.1.abs().max(1.0) * 0.02)
        };
        let mut y = if self.y_from_zero {
            (
                0.0f64.min(y.0),
                y.1 + (y.1 - 0.0f64.min(y.0)).max(1e-3) * 0.08,
            )
        } else {
            padded(y.0, y.1, 0.08, 0.01)
        };
        if self.unit_y {
            y = (y.0.max(0.0), y.1.min(1.0));
        }
        (x, y)
    }
}

fn x_label(chart: &Chart, x: f64) -> String {
    if chart.integer_x {
        if (x - x.round()).abs() < 1e-9 {
            format!("{}", x.round() as i64)
        } else {
            String::new()
        }
    } else if chart.count_x {
        let a = x.abs();
        if a >= 1e6 {
            format!("{:.2}M", x / 1e6)
        } else if a >= 1e3 {
            format!("{:.0}k", x / 1e3)
        } else {
            format!("{x:.0}")
        }
    } else {
        format!("{x}")
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let ((x0, x1), (y0, y1)) = chart.ranges();
    let mut c = ChartBuilder::on(root)
        .caption(&chart.title, (FONT, 30))
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(95)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let x_fmt = |x: &f64| x_label(chart, *x);
    // Enough decimals that neighbouring labels (about a tenth of the span apart) differ.
    let decimals = (-((y1 - y0) / 10.0).log10()).ceil().clamp(2.0, 6.0) as usize;
    let y_fmt = |y: &f64| format!("{y:.decimals$}");
    c.configure_mesh()
        .x_desc(chart.x_desc.as_str())
        .y_desc(chart.y_desc.as_str())
        .x_labels(12)
        .y_labels(10)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 20))
        .axis_desc_style((FONT, 22))
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(RGBColor(242, 242, 242))
        .draw()?;

    for s in &chart.series {
        let colour = colour(s.colour);
        let style = colour.stroke_width(3);
        let points: Vec<(f64, f64)> = finite(&s.points).collect();
        let anno = if s.dashed {
            c.draw_series(DashedLineSeries::new(points.clone(), 12, 8, style))?
        } else {
            c.draw_series(LineSeries::new(points.clone(), style))?
        };
        if let Some(label) = &s.label {
            let dashed = s.dashed;
            anno.label(label.as_str()).legend(move |(x, y)| {
                let path = vec![(x, y), (x + 36, y)];
                if dashed {
                    DashedPathElement::new(path, 8, 5, style).into_dyn()
                } else {
                    PathElement::new(path, style).into_dyn()
                }
            });
        }
        // A lone point draws no line: mark it.
        if s.markers || points.len() == 1 {
            c.draw_series(points.iter().map(|&p| Circle::new(p, 5, colour.filled())))?;
        }
    }
    for (label, dashed) in &chart.styles {
        let style = RGBColor(90, 90, 90).stroke_width(3);
        let dashed = *dashed;
        c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(label.as_str())
            .legend(move |(x, y)| {
                let path = vec![(x, y), (x + 36, y)];
                if dashed {
                    DashedPathElement::new(path, 8, 5, style).into_dyn()
                } else {
                    PathElement::new(path, style).into_dyn()
                }
            });
    }
    if chart.series.iter().any(|s| s.label.is_some()) || !chart.styles.is_empty() {
        c.configure_series_labels()
            .position(match chart.legend {
                Legend::UpperRight => SeriesLabelPosition::UpperRight,
                Legend::LowerRight => SeriesLabelPosition::LowerRight,
            })
            .margin(16)
            .legend_area_size(46)
            .label_font((FONT, 20))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

pub fn render_svg(chart: &Chart) -> Result<String> {
    ensure_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart).map_err(|e| anyhow!("drawing `{}` (svg): {e}", chart.title))?;
    }
    Ok(svg)
}

pub fn render_png(chart: &Chart) -> Result<Vec<u8>> {
    ensure_font()?;
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart).map_err(|e| anyhow!("drawing `{}` (png): {e}", chart.title))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb)
        .ok_or_else(|| anyhow!("bitmap buffer has the wrong size"))?;
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn epoch_series(report: &Report, pick: fn(&super::LogRow) -> (f64, f64)) -> Vec<Series> {
    let mut out = Vec::new();
    for (i, run) in report.runs.iter().enumerate() {
        let (mut val, mut train) = (Vec::new(), Vec::new());
        for r in &run.log {
            let (t, v) = pick(r);
            train.push((r.epoch as f64, t));
            val.push((r.epoch as f64, v));
        }
        out.push(Series {
            label: Some(run.name.clone()),
            colour: i,
            dashed: false,
            markers: false,
            points: val,
        });
        out.push(Series {
            label: None,
            colour: i,
            dashed: true,
            markers: false,
            points: train,
        });
    }
    out
}

fn styles() -> Vec<(String, bool)> {
    vec![("validation".into(), false), ("train".into(), true)]
}

/// Validation (solid) and training (dashed) accuracy by epoch, one colour per run.
pub fn accuracy_chart(report: &Report) -> Option<Chart> {
    if report.runs.is_empty() {
        return None;
    }
    Some(Chart {
        title: format!("{}: accuracy by epoch", report.title.trim()),
        x_desc: "epoch".into(),
        y_desc: "top-1 accuracy".into(),
        series: epoch_series(report, |r| (r.train_accuracy, r.val_accuracy)),
        styles: styles(),
        integer_x: true,
        count_x: false,
        y_from_zero: false,
        unit_y: true,
        legend: Legend::LowerRight,
    })
}

/// Validation (solid) and training (dashed) loss by epoch, one colour per run.
pub fn loss_chart(report: &Report) -> Option<Chart> {
    if report.runs.is_empty() {
        return None;
    }
    Some(Chart {
        title: format!("{}: loss by epoch", report.title.trim()),
        x_desc: "epoch".into(),
        y_desc: "loss (train: training objective, validation: cross-entropy)".into(),
        series: epoch_series(report, |r| (r.train_loss, r.val_loss)),
        styles: styles(),
        integer_x: true,
        count_x: false,
        y_from_zero: true,
        unit_y: false,
        legend: Legend::UpperRight,
    })
}

/// Validation accuracy against parameter count, one line with markers per prune run and rate.
pub fn pruning_chart(report: &Report) -> Option<Chart> {
    if report.prunes.is_empty() {
        return None;
    }
    let series = report
        .prunes
        .iter()
        .enumerate()
        .map(|(i, p)| Series {
            label: Some(format!("{} (rate {})", p.name, p.rows[0].rate)),
            colour: i,
            dashed: false,
            markers: true,
            points: p
                .rows
                .iter()
                .map(|r| (r.params as f64, r.val_accuracy))
                .collect(),
        })
        .collect();
    Some(Chart {
        title: format!("{}: pruning", report.title.trim()),
        x_desc: "trainable parameters".into(),
        y_desc: "validation accuracy".into(),
        series,
        styles: Vec::new(),
        integer_x: false,
        count_x: true,
        y_from_zero: false,
        unit_y: true,
        legend: Legend::LowerRight,
    })
}
