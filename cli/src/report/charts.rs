//! The report's charts, SVG (plotters' SVG backend): the table as bars (log scale: the
//! paper's and our figures are orders of magnitude apart), write-out latency against the
//! bytes dirtied, and `kv`'s throughput against the checkpoint interval.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Report;

/// Writes every chart into `dir`; returns their paths.
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<String>> {
    let files = [
        ("table.svg", table as fn(&Report, &Path) -> Result<()>),
        ("write-out-vs-dirty-bytes.svg", write_out_vs_dirty),
        ("throughput-vs-interval.svg", throughput),
    ];
    let mut written = Vec::new();
    for (name, draw) in files {
        let path = dir.join(name);
        draw(r, &path).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// plotters' errors carry the backend's error type; the message is what matters here.
fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// The name of the category whose unit-wide slot (`i..i + 1`) `x` is the middle of; none
/// elsewhere (the axis asks at every half unit).
fn category_label(names: &[String], x: f64) -> String {
    if (x - x.floor() - 0.5).abs() < 0.01 {
        names.get(x.floor() as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

const SERIES: [(&str, RGBColor); 3] = [
    ("paper, volatile", RGBColor(150, 150, 150)),
    ("paper, NVM", RGBColor(80, 110, 200)),
    ("ours", RGBColor(220, 90, 40)),
];

fn table(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let values: Vec<[f64; 3]> =
        r.rows.iter().map(|row| [row.paper_volatile_ms, row.paper_nvm_ms, row.ours_ms]).collect();
    let top = values.iter().flatten().copied().fold(1.0, f64::max) * 2.0;
    let bottom = values.iter().flatten().copied().filter(|v| *v > 0.0).fold(top, f64::min) / 2.0;
    let n = r.rows.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("The paper's evaluation and ours (ms, log scale)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, (bottom..top).log_scale())
        .map_err(err)?;
    let names: Vec<String> = r.rows.iter().map(|row| row.operation.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| category_label(&names, *x))
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    for (s, (label, color)) in SERIES.iter().enumerate() {
        let bars = values.iter().enumerate().map(|(i, v)| {
            let x0 = i as f64 + 0.15 + 0.24 * s as f64;
            Rectangle::new([(x0, bottom), (x0 + 0.22, v[s].max(bottom))], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(err)?;
    root.present().map_err(err)
}

/// A labelled, coloured line of points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn write_out_vs_dirty(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let kib = |b: u64| (b as f64 / 1024.0).max(1.0);
    let xs: Vec<f64> = r.dirty_sweep.iter().map(|p| kib(p.dirty_bytes)).collect();
    let ys = r.dirty_sweep.iter().flat_map(|p| [p.write_out_ms, p.limit_memcpy_flush_ms]);
    let (x0, x1) = (xs.iter().copied().fold(f64::MAX, f64::min).min(64.0), xs.iter().copied().fold(128.0, f64::max));
    let y1 = ys.clone().fold(1.0, f64::max) * 2.0;
    let y0 = ys.filter(|y| *y > 0.0).fold(y1, f64::min) / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("Write-out latency against the bytes dirtied", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 / 2.0..x1 * 2.0).log_scale(), (y0..y1).log_scale())
        .map_err(err)?;
    chart.configure_mesh().x_desc("KiB dirtied per interval").y_desc("ms").draw().map_err(err)?;
    let series: [Series; 2] = [
        (
            "write-out (guest TSC)",
            SERIES[2].1,
            r.dirty_sweep.iter().map(|p| (kib(p.dirty_bytes), p.write_out_ms)).collect(),
        ),
        (
            "memcpy + clflushopt + sfence of the bytes copied",
            SERIES[1].1,
            r.dirty_sweep.iter().map(|p| (kib(p.dirty_bytes), p.limit_memcpy_flush_ms.max(y0))).collect(),
        ),
    ];
    for (label, color, points) in series {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn throughput(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = r.throughput.len().max(1);
    let top = r.throughput.iter().map(|p| p.ops_per_s / 1e6).fold(1.0, f64::max) * 1.2;
    let labels: Vec<String> = r
        .throughput
        .iter()
        .map(|p| p.interval_ms.map_or("no write-outs".to_string(), |ms| format!("every {ms} ms")))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption("kv throughput against the checkpoint interval", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| category_label(&labels, *x))
        .y_desc("million kv operations per second")
        .draw()
        .map_err(err)?;
    let color = SERIES[2].1;
    chart
        .draw_series(
            r.throughput.iter().enumerate().map(|(i, p)| {
                Rectangle::new([(i as f64 + 0.2, 0.0), (i as f64 + 0.8, p.ops_per_s / 1e6)], color.filled())
            }),
        )
        .map_err(err)?;
    root.present().map_err(err)
}
