//! The sweep report as an SVG line chart: the metric against context scale,
//! one line per method, error bars of one standard deviation over seeds.
//!
//! Written out by hand: the chart is a few dozen elements, and the plotting
//! crates need a font file or the system's font configuration to lay out
//! text, which a headless CI machine may not have.

use std::fmt::Write;

use jepa_common::proto;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

/// The x position of a context-scale range: its low end (the high end is
/// 1.0 in every sweep the paper runs).
fn scale_x(text: &str) -> Option<f64> {
    text.split(':').next().and_then(|low| low.trim().parse().ok())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders the report; rows without a mean are left out of the lines and
/// named in a note under the chart.
pub fn report_svg(report: &proto::GetSweepReportResponse) -> String {
    let percent = report.metric.ends_with("top1");
    let k = if percent { 100.0 } else { 1.0 };
    let sweep = report.sweep.clone().unwrap_or_default();

    // X categories: context scales in numeric order (or one empty category).
    let mut scales: Vec<String> = Vec::new();
    for row in &report.rows {
        if !scales.contains(&row.context_scale) {
            scales.push(row.context_scale.clone());
        }
    }
    scales.sort_by(|a, b| {
        scale_x(a).unwrap_or(f64::MAX).total_cmp(&scale_x(b).unwrap_or(f64::MAX)).then(a.cmp(b))
    });
    let numeric = scales.iter().all(|s| scale_x(s).is_some()) && scales.len() > 1;
    let (x_lo, x_hi) = if numeric {
        let xs: Vec<f64> = scales.iter().filter_map(|s| scale_x(s)).collect();
        (xs.iter().copied().fold(f64::MAX, f64::min), xs.iter().copied().fold(f64::MIN, f64::max))
    } else {
        (0.0, (scales.len().max(2) - 1) as f64)
    };
    let x_of = |scale: &str| -> f64 {
        let v = if numeric {
            scale_x(scale).unwrap_or(x_lo)
        } else {
            scales.iter().position(|s| s == scale).unwrap_or(0) as f64
        };
        let span = (x_hi - x_lo).max(1e-9);
        LEFT + 20.0 + (v - x_lo) / span * (WIDTH - LEFT - RIGHT - 40.0)
    };

    // Y range over means +- std, padded.
    let mut ys: Vec<f64> = Vec::new();
    for row in &report.rows {
        if let Some(mean) = row.mean {
            let s = row.std.unwrap_or(0.0);
            ys.push((mean - s) * k);
            ys.push((mean + s) * k);
        }
    }
    let (mut y_lo, mut y_hi) =
        (ys.iter().copied().fold(f64::MAX, f64::min), ys.iter().copied().fold(f64::MIN, f64::max));
    if ys.is_empty() {
        (y_lo, y_hi) = (0.0, 1.0 * k);
    }
    let pad = ((y_hi - y_lo) * 0.1).max(0.005 * k);
    (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    let y_of = |v: f64| TOP + (y_hi - v) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!("{} ({}): {} against context scale", sweep.name, sweep.id, report.metric);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        (WIDTH - RIGHT + LEFT) / 2.0,
        escape(&title)
    );
    // Axes, grid and ticks.
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    let _ =
        writeln!(svg, r#"<path d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" fill="none" stroke="black"/>"#);
    for i in 0..=5 {
        let v = y_lo + (y_hi - y_lo) * f64::from(i) / 5.0;
        let y = y_of(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.1}</text>"##,
            x0 - 6.0,
            y + 4.0
        );
    }
    for scale in &scales {
        let x = x_of(scale);
        let label = if scale.is_empty() { "-" } else { scale.as_str() };
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            y1 + 5.0,
            y1 + 20.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">context scale (mask.context_scale)</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 18.0
    );
    let y_label = if percent { format!("{} (%)", report.metric) } else { report.metric.clone() };
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        escape(&y_label)
    );

    // One line per method, in the order the rows name them.
    let mut lines: Vec<String> = Vec::new();
    for row in &report.rows {
        if !lines.contains(&row.line) {
            lines.push(row.line.clone());
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut points: Vec<(f64, &proto::SweepReportRow)> = report
            .rows
            .iter()
            .filter(|r| &r.line == line && r.mean.is_some())
            .map(|r| (x_of(&r.context_scale), r))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = points
            .iter()
            .map(|(x, r)| format!("{x:.1},{:.1}", y_of(r.mean.unwrap_or(0.0) * k)))
            .collect();
        if points.len() > 1 {
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for (x, row) in &points {
            let mean = row.mean.unwrap_or(0.0) * k;
            if let Some(std) = row.std {
                let (a, b) = (y_of(mean - std * k), y_of(mean + std * k));
                let _ = writeln!(
                    svg,
                    r#"<path d="M{x:.1},{a:.1} L{x:.1},{b:.1} M{:.1},{a:.1} L{:.1},{a:.1} M{:.1},{b:.1} L{:.1},{b:.1}" stroke="{colour}"/>"#,
                    x - 4.0,
                    x + 4.0,
                    x - 4.0,
                    x + 4.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<circle cx="{x:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{}: {mean:.2} over {} of {} seeds</title></circle>"#,
                y_of(mean),
                escape(&format!("{} @ {}", row.line, row.context_scale)),
                row.reported,
                row.trials
            );
        }
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let label = if line.is_empty() { "all trials".to_string() } else { line.clone() };
        let label =
            label.strip_prefix("conditioning.kind=").map_or(label.clone(), |kind| match kind {
                "none" => "I-JEPA".to_string(),
                "ec" => "EC-IJEPA".to_string(),
                other => other.to_string(),
            });
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            x1 + 15.0,
            x1 + 40.0,
            x1 + 46.0,
            ly + 4.0,
            escape(&label)
        );
    }
    let missing: Vec<&str> =
        report.rows.iter().flat_map(|r| r.missing.iter().map(String::as_str)).collect();
    if !missing.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{x0}" y="{}" font-size="10" fill="#aa0000">missing: {}</text>"##,
            HEIGHT - 4.0,
            escape(&missing.join(", "))
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scale: &str, line: &str, mean: Option<f64>) -> proto::SweepReportRow {
        proto::SweepReportRow {
            context_scale: scale.into(),
            line: line.into(),
            trials: 2,
            reported: u32::from(mean.is_some()) * 2,
            mean,
            std: mean.map(|_| 0.01),
            missing: if mean.is_none() { vec!["run-000007 (failed)".into()] } else { vec![] },
            ..Default::default()
        }
    }

    #[test]
    fn the_chart_has_one_line_per_method_and_names_missing_trials() {
        let report = proto::GetSweepReportResponse {
            metric: "eval/probe_top1".into(),
            rows: vec![
                row("0.4:1.0", "conditioning.kind=none", Some(0.60)),
                row("0.4:1.0", "conditioning.kind=ec", Some(0.70)),
                row("0.85:1.0", "conditioning.kind=none", Some(0.75)),
                row("0.85:1.0", "conditioning.kind=ec", None),
            ],
            ..Default::default()
        };
        let svg = report_svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1, "EC-IJEPA has one point only");
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains(">I-JEPA<") && svg.contains(">EC-IJEPA<"));
        assert!(svg.contains("missing: run-000007 (failed)"));
        assert!(svg.contains(">0.4:1.0<") && svg.contains(">0.85:1.0<"));
    }
}
