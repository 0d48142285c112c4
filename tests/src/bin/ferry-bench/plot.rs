//! `latency.svg`: each scenario's open-loop latency percentiles as bars on a logarithmic axis, so
//! p50 and p99.9 fit on one picture.

use std::fmt::Write as _;

use crate::report::Row;

const WIDTH: f64 = 960.0;
const LEFT: f64 = 200.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 70.0;
const BAR: f64 = 8.0;
const GROUP_GAP: f64 = 14.0;
/// The percentiles drawn, with their colours.
const SERIES: [(&str, &str); 4] =
    [("p50", "#1b9e77"), ("p90", "#7570b3"), ("p99", "#d95f02"), ("p99.9", "#e7298a")];

fn values(r: &Row) -> [f64; 4] {
    [r.p50_us, r.p90_us, r.p99_us, r.p999_us]
}

/// The SVG document; `title` goes on top.
pub fn latency_svg(rows: &[Row], title: &str) -> String {
    let all: Vec<f64> = rows.iter().flat_map(values).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // Whole decades around the data.
    let (d0, d1) = (lo.log10().floor(), hi.log10().ceil());
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |v: f64| LEFT + (v.max(10f64.powf(d0)).log10() - d0) / (d1 - d0) * plot_w;
    let group_h = SERIES.len() as f64 * BAR + GROUP_GAP;
    let height = TOP + rows.len() as f64 * group_h + 50.0;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (name, colour)) in SERIES.iter().enumerate() {
        let lx = LEFT + i as f64 * 90.0;
        let _ = writeln!(svg, r#"<rect x="{lx}" y="34" width="12" height="12" fill="{colour}"/>"#);
        let _ = writeln!(svg, r#"<text x="{}" y="45">{name}</text>"#, lx + 16.0);
    }
    let bottom = height - 40.0;
    for decade in (d0 as i32)..=(d1 as i32) {
        for mult in [1.0, 2.0, 5.0] {
            let v = mult * 10f64.powi(decade);
            if v < 10f64.powf(d0) || v > 10f64.powf(d1) {
                continue;
            }
            let gx = x(v);
            let stroke = if mult == 1.0 { "#bbb" } else { "#e5e5e5" };
            let _ = writeln!(
                svg,
                r#"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{bottom}" stroke="{stroke}"/>"#
            );
            let _ = writeln!(
                svg,
                r#"<text x="{gx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 15.0,
                label(v)
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">latency, µs (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 32.0
    );
    for (g, row) in rows.iter().enumerate() {
        let y0 = TOP + g as f64 * group_h;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y0 + SERIES.len() as f64 * BAR / 2.0 + 4.0,
            escape(&row.name)
        );
        for (i, v) in values(row).iter().enumerate() {
            let y = y0 + i as f64 * BAR;
            let w = (x(*v) - LEFT).max(0.0);
            let _ = writeln!(
                svg,
                r#"<rect x="{LEFT}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{} {}: {v:.1} µs</title></rect>"#,
                BAR - 1.0,
                SERIES[i].1,
                escape(&row.name),
                SERIES[i].0
            );
        }
    }
    svg += "</svg>\n";
    svg
}

/// A tick label: 10, 200, 5k, 10k, 1M.
fn label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

/// `s` made safe as the text of an SVG element (also used by [`crate::flame`]).
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short() {
        assert_eq!(label(20.0), "20");
        assert_eq!(label(5000.0), "5k");
        assert_eq!(label(1e6), "1M");
    }

    #[test]
    fn escape_protects_markup() {
        assert_eq!(escape("a<b>&"), "a&lt;b&gt;&amp;");
    }
}
