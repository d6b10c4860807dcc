//! The rows of the benchmark report, their ratios, and the report as a Markdown table.
//!
//! Every row compares one of ours against one peer on one workload. Its ratio is always our
//! speed over the peer's, so above 1 means ours is faster whatever the unit: for a time or a
//! latency (lower is better) it is the peer's value over ours, for a throughput ours over the
//! peer's.

use std::fmt::Write as _;

/// Which direction of a measurement is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Times and latencies.
    Lower,
    /// Throughputs (MiB/s, IOPS).
    Higher,
}

/// One measured number with its unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// The number, in `unit`.
    pub amount: f64,
    /// `s`, `ms`, `MiB/s` or `IOPS`.
    pub unit: &'static str,
    /// Which direction is good.
    pub better: Better,
}

impl Value {
    /// A throughput in MiB/s.
    pub fn mib_s(amount: f64) -> Value {
        Value {
            amount,
            unit: "MiB/s",
            better: Better::Higher,
        }
    }

    /// Requests per second.
    pub fn iops(amount: f64) -> Value {
        Value {
            amount,
            unit: "IOPS",
            better: Better::Higher,
        }
    }

    /// A latency in milliseconds.
    pub fn ms(amount: f64) -> Value {
        Value {
            amount,
            unit: "ms",
            better: Better::Lower,
        }
    }

    /// A duration in seconds.
    pub fn seconds(amount: f64) -> Value {
        Value {
            amount,
            unit: "s",
            better: Better::Lower,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Three significant digits or whole numbers: enough for numbers that move by
        // several percent from run to run.
        let a = self.amount;
        if a >= 100.0 {
            write!(f, "{a:.0} {}", self.unit)
        } else if a >= 10.0 {
            write!(f, "{a:.1} {}", self.unit)
        } else if a >= 1.0 {
            write!(f, "{a:.2} {}", self.unit)
        } else {
            write!(f, "{a:.3} {}", self.unit)
        }
    }
}

/// What a row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Both sides were measured.
    Measured {
        /// Ours.
        ours: Value,
        /// The peer's.
        peer: Value,
    },
    /// Our side of the comparison does not exist yet; `issue` is where it is planned.
    /// (Every row is measured today; kept for the next planned comparison.)
    #[allow(dead_code)]
    NotYet {
        /// The issue number.
        issue: u32,
    },
    /// The measurement failed; the reason.
    Failed(String),
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The comparison it belongs to: `engine`, `guest NBD`, `serve`, `scrape`, ...
    pub area: String,
    /// The workload.
    pub workload: String,
    /// What of ours runs it.
    pub ours: String,
    /// What it is compared with.
    pub peer: String,
    /// The numbers.
    pub outcome: Outcome,
}

impl Row {
    /// A measured row.
    pub fn measured(
        area: &str,
        workload: &str,
        ours: &str,
        peer: &str,
        ours_value: Value,
        peer_value: Value,
    ) -> Row {
        Row {
            area: area.into(),
            workload: workload.into(),
            ours: ours.into(),
            peer: peer.into(),
            outcome: Outcome::Measured {
                ours: ours_value,
                peer: peer_value,
            },
        }
    }

    /// A row whose side of ours is planned in `issue` (unused while every row is measured).
    #[allow(dead_code)]
    pub fn not_yet(area: &str, workload: &str, ours: &str, peer: &str, issue: u32) -> Row {
        Row {
            area: area.into(),
            workload: workload.into(),
            ours: ours.into(),
            peer: peer.into(),
            outcome: Outcome::NotYet { issue },
        }
    }

    /// A row whose measurement failed.
    pub fn failed(area: &str, workload: &str, ours: &str, peer: &str, why: &str) -> Row {
        Row {
            area: area.into(),
            workload: workload.into(),
            ours: ours.into(),
            peer: peer.into(),
            outcome: Outcome::Failed(why.into()),
        }
    }

    /// Our speed over the peer's (above 1: ours is faster); `None` unless measured with
    /// positive, finite numbers in the same unit.
    pub fn ratio(&self) -> Option<f64> {
        let Outcome::Measured { ours, peer } = &self.outcome else {
            return None;
        };
        if ours.unit != peer.unit || ours.better != peer.better {
            return None;
        }
        let r = match ours.better {
            Better::Higher => ours.amount / peer.amount,
            Better::Lower => peer.amount / ours.amount,
        };
        (r.is_finite() && r > 0.0).then_some(r)
    }

    /// The ratio column: `1.15`, `not yet: issue 16`, `failed` or `n/a`.
    pub fn ratio_text(&self) -> String {
        match (&self.outcome, self.ratio()) {
            (Outcome::Measured { .. }, Some(r)) => format!("{r:.2}"),
            (Outcome::Measured { .. }, None) => "n/a".into(),
            (Outcome::NotYet { issue }, _) => format!("not yet: issue {issue}"),
            (Outcome::Failed(_), _) => "failed".into(),
        }
    }

    /// A short label for the chart: `engine: 4 KiB random reads, full image vs imago`.
    pub fn label(&self) -> String {
        format!(
            "{}: {} — {} vs {}",
            self.area, self.workload, self.ours, self.peer
        )
    }
}

/// Escapes `|` so a cell cannot split a Markdown table row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The rows as a Markdown table: area, workload, ours, peer, both numbers and the ratio.
/// Failed rows carry their reason in the peer's number column.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| area | workload | ours | peer | ours | peer | ratio |\n|---|---|---|---|---:|---:|---:|"
    );
    for r in rows {
        let (a, b) = match &r.outcome {
            Outcome::Measured { ours, peer } => (ours.to_string(), peer.to_string()),
            Outcome::NotYet { .. } => ("—".into(), "—".into()),
            Outcome::Failed(why) => ("—".into(), why.clone()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            cell(&r.area),
            cell(&r.workload),
            cell(&r.ours),
            cell(&r.peer),
            cell(&a),
            cell(&b),
            r.ratio_text()
        );
    }
    s
}

/// The rows as aligned plain text for the terminal (failure reasons are in the Markdown file).
pub fn text_table(rows: &[Row]) -> String {
    let head = ["area", "workload", "ours vs peer", "ours", "peer", "ratio"];
    let lines: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let (a, b) = match &r.outcome {
                Outcome::Measured { ours, peer } => (ours.to_string(), peer.to_string()),
                _ => ("-".into(), "-".into()),
            };
            [
                r.area.clone(),
                r.workload.clone(),
                format!("{} vs {}", r.ours, r.peer),
                a,
                b,
                r.ratio_text(),
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for l in &lines {
        for (w, c) in width.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            let pad = w - c.chars().count();
            // Numbers right-aligned, words left-aligned.
            if (3..5).contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                out.push_str(&" ".repeat(pad));
            }
            out.push_str("  ");
        }
        let _ = writeln!(s, "{}", out.trim_end());
    };
    line(head);
    for l in &lines {
        line([&l[0], &l[1], &l[2], &l[3], &l[4], &l[5]].map(String::as_str));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Row> {
        vec![
            Row::measured(
                "engine",
                "4 KiB random reads",
                "qcow-metal",
                "imago",
                Value::iops(900_000.0),
                Value::iops(600_000.0),
            ),
            Row::measured(
                "scrape",
                "p99 latency",
                "under NBD load",
                "idle",
                Value::ms(8.0),
                Value::ms(4.0),
            ),
            Row::not_yet("serve", "NBD throughput", "serve", "qemu-nbd", 16),
            Row::failed("guest NBD", "1 MiB read", "(a)", "(b)", "QEMU | died"),
        ]
    }

    #[test]
    fn ratio_is_our_speed_over_the_peers() {
        let rows = sample();
        // Throughput: ours / peer.
        assert!((rows[0].ratio().unwrap() - 1.5).abs() < 1e-12);
        // Latency: peer / ours (twice as slow under load = 0.5).
        assert!((rows[1].ratio().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(rows[2].ratio(), None);
        assert_eq!(rows[3].ratio(), None);
        // Mixed units or a zero have no ratio.
        let mixed = Row::measured("x", "y", "a", "b", Value::ms(1.0), Value::seconds(1.0));
        assert_eq!(mixed.ratio(), None);
        assert_eq!(mixed.ratio_text(), "n/a");
        let zero = Row::measured("x", "y", "a", "b", Value::ms(0.0), Value::ms(1.0));
        assert_eq!(zero.ratio(), None);
    }

    #[test]
    fn ratio_texts() {
        let rows = sample();
        assert_eq!(rows[0].ratio_text(), "1.50");
        assert_eq!(rows[1].ratio_text(), "0.50");
        assert_eq!(rows[2].ratio_text(), "not yet: issue 16");
        assert_eq!(rows[3].ratio_text(), "failed");
    }

    #[test]
    fn values_keep_about_three_digits() {
        assert_eq!(Value::iops(900_123.4).to_string(), "900123 IOPS");
        assert_eq!(Value::mib_s(42.25).to_string(), "42.2 MiB/s");
        assert_eq!(Value::ms(2.5049).to_string(), "2.50 ms");
        assert_eq!(Value::seconds(0.25449).to_string(), "0.254 s");
    }

    #[test]
    fn markdown_table_has_every_row_and_escapes_pipes() {
        let t = markdown_table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 4);
        assert_eq!(
            lines[2],
            "| engine | 4 KiB random reads | qcow-metal | imago | 900000 IOPS | 600000 IOPS | 1.50 |"
        );
        assert_eq!(
            lines[4],
            "| serve | NBD throughput | serve | qemu-nbd | — | — | not yet: issue 16 |"
        );
        assert!(lines[5].contains("QEMU \\| died"), "{}", lines[5]);
        // Every line has the same number of unescaped cell separators.
        for l in &lines {
            assert_eq!(l.replace("\\|", "").matches('|').count(), 8, "{l}");
        }
    }

    #[test]
    fn text_table_aligns_columns() {
        let t = text_table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("area"));
        // The ratio column starts at the same place on every line.
        let col = lines[0].find("ratio").unwrap();
        assert_eq!(&lines[1][col..], "1.50");
        assert_eq!(&lines[3][col..], "not yet: issue 16");
        assert_eq!(&lines[4][col..], "failed");
    }
}
