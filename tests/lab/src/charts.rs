//! The charts of `asmn-lab eval`: line charts (time series) and grouped bar charts, each
//! written as PNG and SVG with plotters. Text is drawn with ab_glyph from DejaVu Sans
//! (Debian's `fonts-dejavu-core`), registered once.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Where Debian keeps the font.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A vertical marker line at `x`, with a legend text.
#[derive(Debug, Clone)]
pub struct Marker {
    /// Where.
    pub x: f64,
    /// What it marks.
    pub name: String,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Title.
    pub title: String,
    /// Axis descriptions.
    pub x_label: String,
    /// Axis descriptions.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Vertical markers.
    pub markers: Vec<Marker>,
}

/// A grouped bar chart: one group per category, one bar per series in each group.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Title.
    pub title: String,
    /// The y axis description.
    pub y_label: String,
    /// The groups' names.
    pub categories: Vec<String>,
    /// (series name, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
}

fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("{FONT}: {e} (install fonts-dejavu-core for the charts' text)")
            })?;
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT}: not a usable font"))
        })
        .clone()
}

const SIZE: (u32, u32) = (960, 540);

/// Writes `chart` to `stem.png` and `stem.svg`.
pub fn line_chart(stem: &Path, chart: &LineChart) -> Result<(), String> {
    font()?;
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_lines(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    draw_lines(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)
}

/// Writes `chart` to `stem.png` and `stem.svg`.
pub fn bar_chart(stem: &Path, chart: &BarChart) -> Result<(), String> {
    font()?;
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_bars(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    draw_bars(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    }
}

fn draw_lines<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &LineChart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (x0, x1) = range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (_, y1) = range(c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let y1 = y1 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(c.x_label.as_str())
        .y_desc(c.y_label.as_str())
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (i, s) in c.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    for (i, m) in c.markers.iter().enumerate() {
        let color = if i == 0 { BLACK } else { RED }.to_rgba();
        chart
            .draw_series(LineSeries::new(
                vec![(m.x, 0.0), (m.x, y1)],
                color.stroke_width(1),
            ))
            .map_err(e)?
            .label(m.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn draw_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &BarChart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let n = c.categories.len().max(1);
    let (_, y1) = range(c.series.iter().flat_map(|s| s.1.iter().copied()));
    let y1 = y1 * 1.15;
    let categories = c.categories.clone();
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x: &f64| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                categories.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(c.y_label.as_str())
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    let k = c.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, values)) in c.series.iter().enumerate() {
        let color = Palette99::pick(j).to_rgba();
        let left = |i: usize| i as f64 - 0.4 + j as f64 * width;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                Rectangle::new(
                    [(left(i), 0.0), (left(i) + width * 0.95, *v)],
                    color.filled(),
                )
            }))
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_png_and_svg() {
        if !Path::new(FONT).exists() {
            assert!(
                std::env::var("CI").is_err(),
                "{FONT} is missing (fonts-dejavu-core)"
            );
            asmn_shared::skip::note(&format!("{FONT} is missing (install fonts-dejavu-core)"));
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("line");
        line_chart(
            &stem,
            &LineChart {
                title: "t".into(),
                x_label: "s".into(),
                y_label: "Mbit/s".into(),
                series: vec![Series {
                    name: "a".into(),
                    points: vec![(0.0, 1.0), (1.0, 3.0)],
                }],
                markers: vec![Marker {
                    x: 0.5,
                    name: "m".into(),
                }],
            },
        )
        .expect("line chart");
        let bars = dir.path().join("bars");
        bar_chart(
            &bars,
            &BarChart {
                title: "b".into(),
                y_label: "us".into(),
                categories: vec!["x".into(), "y".into()],
                series: vec![("s".into(), vec![1.0, 2.0])],
            },
        )
        .expect("bar chart");
        for stem in [stem, bars] {
            let png = std::fs::read(stem.with_extension("png")).expect("png");
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            let svg = std::fs::read_to_string(stem.with_extension("svg")).expect("svg");
            assert!(svg.contains("<svg") && svg.contains("</svg>"));
        }
    }
}
