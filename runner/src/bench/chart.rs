//! The report's chart: one horizontal bar per row, its ratio on a log scale, bars growing
//! right of the 1.0 line where ours is faster and left of it where ours is slower. Rows that
//! were not measured keep their line and say why.
//!
//! Drawn with `plotters` into a PNG; the text uses a font compiled into the binary (no system
//! fonts, no fontconfig).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use super::report::{Outcome, Row};

/// The font family name the chart registers and uses.
const FONT: &str = "sans-serif";
/// Pixel height of one row.
const ROW_PX: u32 = 26;
/// Chart width.
const WIDTH: u32 = 1800;

/// Registers the embedded font with plotters (once per process).
fn register() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR)
            .map_err(|_| "the embedded font did not load".to_string())
    })
    .clone()
}

/// The x range: every ratio, 1.0 and some room for the numbers printed after the bars.
fn x_range(rows: &[Row]) -> (f64, f64) {
    let mut lo: f64 = 0.5;
    let mut hi: f64 = 2.0;
    for r in rows.iter().filter_map(Row::ratio) {
        lo = lo.min(r);
        hi = hi.max(r);
    }
    (lo / 1.6, hi * 2.2)
}

/// The 1-2-5 values from `lo` to `hi` (both positive).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powi(lo.log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            // Rounded so that 0.1 * 2 prints as 0.2, not 0.20000000000000004.
            let t = (m * decade * 1e6).round() / 1e6;
            if t >= lo && t <= hi && t > 0.0 {
                out.push(t);
            }
        }
        decade *= 10.0;
    }
    out
}

/// Draws `rows` with `title` above them into a PNG at `path`.
pub fn write_png(rows: &[Row], title: &str, path: &Path) -> Result<(), String> {
    register()?;
    let n = rows.len().max(1);
    let height = 140 + ROW_PX * n as u32;
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;

    let label_style = TextStyle::from((FONT, 15).into_font()).color(&BLACK);
    let labels: Vec<String> = rows.iter().map(Row::label).collect();
    let label_width = labels
        .iter()
        .filter_map(|l| root.estimate_text_size(l, &label_style).ok())
        .map(|(w, _)| w)
        .max()
        .unwrap_or(100)
        .min(WIDTH * 2 / 3);

    let (lo, hi) = x_range(rows);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20).into_font())
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(label_width + 12)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..n as f64)
        .map_err(|e| err(&e))?;
    // Row i (from the top) spans y in [n-1-i, n-i].
    let top = |i: usize| (n - i) as f64;
    let faster = RGBColor(46, 139, 87);
    let slower = RGBColor(214, 96, 77);
    let grey = RGBColor(120, 120, 120);
    // Alternate rows on a light band, under the grid.
    for i in (0..rows.len()).step_by(2) {
        chart
            .draw_series([Rectangle::new(
                [(lo, top(i) - 1.0), (hi, top(i))],
                RGBColor(242, 244, 247).filled(),
            )])
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_mesh()
        .disable_mesh()
        .y_labels(0)
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .x_desc("ratio = our speed / the peer's (log scale; right of 1: ours is faster)")
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| err(&e))?;
    // Grid lines and tick labels at 1-2-5 steps (plotters' log axis labels powers of ten only).
    let tick_style = TextStyle::from((FONT, 14).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for t in ticks(lo, hi) {
        chart
            .draw_series([PathElement::new(
                vec![(t, 0.0), (t, n as f64)],
                RGBColor(215, 218, 222).stroke_width(1),
            )])
            .map_err(|e| err(&e))?;
        let (px, py) = chart.backend_coord(&(t, 0.0));
        root.draw(&Text::new(
            format!("{t}"),
            (px, py + 10),
            tick_style.clone(),
        ))
        .map_err(|e| err(&e))?;
    }

    for (i, row) in rows.iter().enumerate() {
        let (y0, y1) = (top(i) - 0.82, top(i) - 0.18);
        let mid = top(i) - 0.5;
        let small = TextStyle::from((FONT, 14).into_font());
        match (row.ratio(), &row.outcome) {
            (Some(r), _) => {
                let color = if r >= 1.0 { faster } else { slower };
                chart
                    .draw_series([Rectangle::new(
                        [(r.min(1.0), y0), (r.max(1.0), y1)],
                        color.filled(),
                    )])
                    .map_err(|e| err(&e))?;
                let (at, pos) = if r >= 1.0 {
                    (r * 1.04, Pos::new(HPos::Left, VPos::Center))
                } else {
                    (r / 1.04, Pos::new(HPos::Right, VPos::Center))
                };
                chart
                    .draw_series([Text::new(
                        format!("{r:.2}"),
                        (at, mid),
                        small.clone().color(&BLACK).pos(pos),
                    )])
                    .map_err(|e| err(&e))?;
            }
            (None, outcome) => {
                let why = match outcome {
                    Outcome::NotYet { issue } => format!("not yet: issue {issue}"),
                    Outcome::Failed(_) => "failed (see report.md)".into(),
                    Outcome::Measured { .. } => "n/a".into(),
                };
                chart
                    .draw_series([Text::new(
                        why,
                        (1.04, mid),
                        small
                            .clone()
                            .color(&grey)
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    )])
                    .map_err(|e| err(&e))?;
            }
        }
        // The row's label, right-aligned against the plot's left edge.
        let (px, py) = chart.backend_coord(&(lo, mid));
        root.draw(&Text::new(
            labels[i].clone(),
            (px - 8, py),
            label_style.clone().pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(|e| err(&e))?;
    }
    chart
        .draw_series([PathElement::new(
            vec![(1.0, 0.0), (1.0, n as f64)],
            BLACK.stroke_width(2),
        )])
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::report::Value;
    use super::*;

    #[test]
    fn writes_a_png_of_the_rows() {
        let rows = vec![
            Row::measured(
                "engine",
                "4 KiB random writes, fresh image",
                "qcow-metal",
                "imago",
                Value::seconds(0.25),
                Value::seconds(0.30),
            ),
            Row::measured(
                "engine",
                "4 KiB random reads, full image",
                "qcow-metal",
                "raw-file",
                Value::iops(500_000.0),
                Value::iops(1_000_000.0),
            ),
            Row::measured(
                "scrape",
                "p99",
                "under NBD load",
                "idle",
                Value::ms(3.0),
                Value::ms(45.0),
            ),
            Row::not_yet("serve", "NBD throughput", "serve", "qemu-nbd", 16),
            Row::failed("guest NBD", "1 MiB read", "(a)", "(b)", "QEMU died"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        write_png(&rows, "sample", &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (WIDTH, 140 + ROW_PX * 5));
        // Text and bars make a picture far larger than a blank one compresses to.
        assert!(bytes.len() > 10_000, "only {} bytes", bytes.len());
        assert_eq!(&bytes[bytes.len() - 8..bytes.len() - 4], b"IEND");
    }

    #[test]
    fn x_range_holds_every_ratio_and_one() {
        let rows = vec![Row::measured(
            "a",
            "b",
            "c",
            "d",
            Value::ms(10.0),
            Value::ms(1.0),
        )];
        let (lo, hi) = x_range(&rows);
        assert!(lo < 0.1 && hi > 2.0, "{lo} {hi}");
        let (lo, hi) = x_range(&[]);
        assert!(lo < 0.5 && hi > 2.0);
    }

    #[test]
    fn ticks_step_one_two_five() {
        assert_eq!(ticks(0.3, 12.0), vec![0.5, 1.0, 2.0, 5.0, 10.0]);
        assert_eq!(ticks(0.05, 0.3), vec![0.05, 0.1, 0.2]);
        assert_eq!(ticks(1.5, 1.9), Vec::<f64>::new());
    }
}
