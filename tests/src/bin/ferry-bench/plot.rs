//! `latency.svg`: each scenario's open-loop latency percentiles as bars on a logarithmic axis, so
//! p50 and p99.9 fit on one picture. Drawn with plotters' SVG backend.

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Row;

const WIDTH: u32 = 960;
/// Room for the scenario names left of the bars.
const LEFT: u32 = 190;
/// Height of one scenario's group of bars.
const GROUP: u32 = 46;
/// Room for the title and the x axis.
const FRAME: u32 = 110;
/// The percentiles drawn, with their colours.
const SERIES: [(&str, RGBColor); 4] = [
    ("p50", RGBColor(0x1b, 0x9e, 0x77)),
    ("p90", RGBColor(0x75, 0x70, 0xb3)),
    ("p99", RGBColor(0xd9, 0x5f, 0x02)),
    ("p99.9", RGBColor(0xe7, 0x29, 0x8a)),
];

fn values(r: &Row) -> [f64; 4] {
    [r.p50_us, r.p90_us, r.p99_us, r.p999_us]
}

/// The SVG document; `title` goes on top.
pub fn latency_svg(rows: &[Row], title: &str) -> Result<String> {
    let all: Vec<f64> = rows.iter().flat_map(values).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // Whole decades around the data.
    let (lo, hi) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
    let n = rows.len().max(1);
    let height = FRAME + n as u32 * GROUP;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(LEFT)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..n as f64)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .bold_line_style(RGBColor(0xbb, 0xbb, 0xbb))
            .light_line_style(RGBColor(0xe5, 0xe5, 0xe5))
            .x_desc("latency, µs (log scale)")
            .x_label_formatter(&|v| label(*v))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (j, (name, colour)) in SERIES.iter().enumerate() {
            // The first scenario at the top; each group holds the four percentiles, p50 on top.
            let bars = rows.iter().enumerate().filter_map(move |(i, row)| {
                let v = values(row)[j];
                let top = (n - i) as f64 - 0.1 - j as f64 * 0.2;
                (v > 0.0).then(|| Rectangle::new([(lo, top), (v.min(hi), top - 0.18)], colour.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(|e| anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let name_style =
            TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        for (i, row) in rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(lo, (n - i) as f64 - 0.5));
            root.draw(&Text::new(row.name.as_str(), (x - 8, y), &name_style)).map_err(|e| anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short() {
        assert_eq!(label(20.0), "20");
        assert_eq!(label(5000.0), "5k");
        assert_eq!(label(1e6), "1M");
    }
}
