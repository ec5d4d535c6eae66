//! What a run reports: a JSON summary, a CSV time series and SVG plots.
//!
//! Everything is a function of the scenario and the seed (no wall-clock value goes into
//! a report), so two runs with the same inputs write byte-identical files.

use std::fmt::Write as _;

use serde::Serialize;

/// One point of the time series (every `sample_ms`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub turns_per_s: f64,
    /// Busiest node's turns/s over the average of the nodes serving conversations.
    pub load_max_over_avg: f64,
    /// Least busy serving node's turns/s over the average.
    pub load_min_over_avg: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub nodes_running: usize,
    /// Fewest and most members a node sees up (over up to 32 sampled nodes).
    pub members_up_min: usize,
    pub members_up_max: usize,
    /// Running totals.
    pub failed_attempts: u64,
    pub moved_shards: u64,
}

/// The summary of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub simulated_s: u64,
    pub nodes_final: usize,
    pub turns_sent: u64,
    pub turns_acknowledged: u64,
    /// Sent but not answered when the run ended (still retrying or in service).
    pub turns_in_flight_at_end: u64,
    /// Attempts that failed (`unavailable`, timeouts) and were retried by the client.
    pub failed_attempts: u64,
    /// Client-side latency of acknowledged turns, retries included.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    /// Busiest node over the average, per sample: mean and worst (first 2 samples skipped).
    pub load_max_over_avg_mean: f64,
    pub load_max_over_avg_max: f64,
    /// Shards moved by the rebalancer.
    pub shards_moved: u64,
    /// Conversations that changed owner (acquired by a new node).
    pub handoffs: u64,
    /// Writes refused because another node acquired the conversation meanwhile.
    pub fenced_writes: u64,
    /// Per crash: seconds until the last node that noticed declared it down.
    pub detection_s: Vec<f64>,
    /// Down declarations about a running, unfrozen, reachable node.
    pub false_down_declarations: u64,
    /// Conversations that had at least one failed attempt, and the time their clients
    /// spent waiting through failures (sum, worst).
    pub unavailable_conversations: u64,
    pub unavailable_s_total: f64,
    pub unavailable_s_max: f64,
    /// Acknowledged turns an acquire could not find on any reachable copy.
    pub turns_lost: u64,
    /// Samples in which some checked shard had two owners among the majority's nodes.
    pub dual_owner_samples: u64,
    pub datagrams_sent: u64,
    pub datagrams_dropped: u64,
    /// Checker failures (empty when every invariant held).
    pub failures: Vec<String>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
    /// The scenario's faults, for the plots' markers.
    #[serde(skip)]
    pub markers: Vec<(f64, String)>,
}

impl Report {
    pub fn to_json(&self) -> String {
        json_line(self)
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "t_s,turns_per_s,load_max_over_avg,load_min_over_avg,p50_ms,p99_ms,p999_ms,nodes_running,members_up_min,members_up_max,failed_attempts,moved_shards\n",
        );
        for s in &self.samples {
            let _ = writeln!(
                out,
                "{:.3},{:.1},{:.4},{:.4},{:.3},{:.3},{:.3},{},{},{},{},{}",
                s.t_s,
                s.turns_per_s,
                s.load_max_over_avg,
                s.load_min_over_avg,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.nodes_running,
                s.members_up_min,
                s.members_up_max,
                s.failed_attempts,
                s.moved_shards
            );
        }
        out
    }

    /// The times of the samples, and the metrics compared across seeds.
    pub fn seed_series(&self) -> (Vec<f64>, Vec<SeedSeries>) {
        let t = self.samples.iter().map(|s| s.t_s).collect();
        let series = |f: fn(&Sample) -> f64| -> Vec<f64> { self.samples.iter().map(f).collect() };
        (
            t,
            vec![
                (
                    "throughput.svg",
                    "acknowledged turns",
                    "turns/s",
                    Scale::Linear,
                    series(|s| s.turns_per_s),
                ),
                (
                    "latency.svg",
                    "turn latency p99",
                    "p99 (ms, log scale)",
                    Scale::Log,
                    series(|s| s.p99_ms),
                ),
                (
                    "balance.svg",
                    "busiest node",
                    "busiest node's turns/s over the average",
                    Scale::Linear,
                    series(|s| s.load_max_over_avg),
                ),
            ],
        )
    }

    /// The plots: (file name, SVG).
    pub fn plots(&self) -> Vec<(&'static str, String)> {
        let t: Vec<f64> = self.samples.iter().map(|s| s.t_s).collect();
        let series = |f: fn(&Sample) -> f64| -> Vec<f64> { self.samples.iter().map(f).collect() };
        vec![
            (
                "balance.svg",
                balance_chart(
                    format!("{}: load balance", self.scenario),
                    "a node's turns/s over the average",
                    "every node (least to busiest)",
                    &t,
                    [series(|s| s.load_min_over_avg), series(|s| s.load_max_over_avg)],
                    &self.markers,
                ),
            ),
            (
                "latency.svg",
                latency_chart(
                    format!("{}: turn latency", self.scenario),
                    &t,
                    [series(|s| s.p50_ms), series(|s| s.p99_ms), series(|s| s.p999_ms)],
                    &self.markers,
                ),
            ),
            (
                "membership.svg",
                membership_chart(
                    format!("{}: membership", self.scenario),
                    &t,
                    [
                        series(|s| s.nodes_running as f64),
                        series(|s| s.members_up_min as f64),
                        series(|s| s.members_up_max as f64),
                    ],
                    &self.markers,
                ),
            ),
        ]
    }
}

/// A report as pretty JSON ending in a newline.
pub(crate) fn json_line(report: &impl Serialize) -> String {
    let mut json = serde_json::to_string_pretty(report).expect("reports serialize");
    json.push('\n');
    json
}

/// How a chart's y axis is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Logarithmic (for latency percentiles); values at or below 0 are left out.
    Log,
}

const PALETTE: [plotters::style::RGBColor; 5] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(255, 127, 14),
];

/// A line chart drawn with plotters: titled, axes with ticks and units (time in simulated
/// seconds), a light grid, one line per series and a legend.
/// What a chart shows: a title, the y axis's label and scale, time (s), the series, and
/// markers (time, label) drawn as dashed vertical lines (the scenario's faults).
pub(crate) struct Chart<'a> {
    pub title: String,
    /// What `t` is (simulated seconds in a run's charts, a setting in a sweep's).
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub scale: Scale,
    pub t: &'a [f64],
    pub series: Vec<(&'a str, Vec<f64>)>,
    pub markers: &'a [(f64, String)],
    /// A shaded band between two series (its name, lower, upper), drawn under the lines.
    pub band: Option<(&'a str, Vec<f64>, Vec<f64>)>,
}

/// The x axis of a run's charts.
pub(crate) const TIME: &str = "simulated time (s)";

pub(crate) fn chart(c: &Chart<'_>) -> String {
    let mut svg = String::new();
    draw(&mut svg, c).expect("a chart draws into a string");
    svg.push('\n');
    svg
}

/// Latency percentiles p50, p99 and p99.9 (ms) on a log scale.
pub(crate) fn latency_chart(
    title: String,
    t: &[f64],
    [p50, p99, p999]: [Vec<f64>; 3],
    markers: &[(f64, String)],
) -> String {
    chart(&Chart {
        title,
        x_label: TIME,
        y_label: "latency (ms, log scale)",
        scale: Scale::Log,
        t,
        series: vec![("p50", p50), ("p99", p99), ("p99.9", p999)],
        markers,
        band: None,
    })
}

/// Load over the average: the busiest as a line over a band from the least to the busiest.
pub(crate) fn balance_chart(
    title: String,
    y_label: &str,
    band_label: &str,
    t: &[f64],
    [least, busiest]: [Vec<f64>; 2],
    markers: &[(f64, String)],
) -> String {
    chart(&Chart {
        title,
        x_label: TIME,
        y_label,
        scale: Scale::Linear,
        t,
        series: vec![("busiest", busiest.clone())],
        markers,
        band: Some((band_label, least, busiest)),
    })
}

/// Nodes running, and the fewest and most members a node sees up.
pub(crate) fn membership_chart(
    title: String,
    t: &[f64],
    [running, up_min, up_max]: [Vec<f64>; 3],
    markers: &[(f64, String)],
) -> String {
    chart(&Chart {
        title,
        x_label: TIME,
        y_label: "nodes",
        scale: Scale::Linear,
        t,
        series: vec![("running", running), ("seen up (min)", up_min), ("seen up (max)", up_max)],
        markers,
        band: None,
    })
}

fn draw(svg: &mut String, c: &Chart<'_>) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let (title, y_label, scale, t, series) = (&c.title, c.y_label, c.scale, c.t, &c.series);
    let root = SVGBackend::with_string(svg, (760, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let t_max = t.iter().copied().fold(0.0, f64::max).max(1e-9);
    let keep = |v: f64| v.is_finite() && (scale == Scale::Linear || v > 0.0);
    let band_values = c.band.iter().flat_map(|(_, lo, hi)| lo.iter().chain(hi).copied());
    let values = || {
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .chain(band_values.clone())
            .filter(|&v| keep(v))
    };
    let y_max = values().fold(f64::MIN, f64::max);
    let y_min = values().fold(f64::MAX, f64::min);
    let (y_min, y_max) = if y_max < y_min { (0.0, 1.0) } else { (y_min, y_max) };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(c.x_label)
                .y_desc(y_label)
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            let (y_lo, y_hi) = {
                let r = chart.plotting_area().get_y_range();
                (r.start, r.end)
            };
            for (at, label) in c.markers {
                let grey = RGBColor(120, 120, 120);
                chart.draw_series(DashedLineSeries::new(
                    [(*at, y_lo), (*at, y_hi)],
                    4,
                    3,
                    grey.stroke_width(1),
                ))?;
                chart.draw_series(std::iter::once(Text::new(
                    label.clone(),
                    (*at, y_hi),
                    ("sans-serif", 11).into_font().color(&grey),
                )))?;
            }
            if let Some((name, lo, hi)) = &c.band {
                let shade = RGBColor(31, 119, 180).mix(0.18);
                let upper = t.iter().zip(hi).map(|(&x, &y)| (x, y));
                let lower = t.iter().zip(lo).rev().map(|(&x, &y)| (x, y));
                let outline: Vec<(f64, f64)> =
                    upper.chain(lower).filter(|&(_, y)| keep(y)).collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, shade.filled())))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 4), (x + 18, y + 4)], shade.filled())
                    });
            }
            for (k, (name, v)) in series.iter().enumerate() {
                let color = PALETTE[k % PALETTE.len()];
                let points = t.iter().zip(v).filter(|(_, &v)| keep(v)).map(|(&x, &y)| (x, y));
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }};
    }
    match scale {
        Scale::Linear => {
            let lo = y_min.min(0.0);
            let hi = if y_max > lo { y_max * 1.05 } else { lo + 1.0 };
            finish!(builder.build_cartesian_2d(0.0..t_max, lo..hi)?);
        }
        Scale::Log => {
            let lo = y_min.max(1e-6) / 1.5;
            let hi = (y_max * 1.5).max(lo * 10.0);
            finish!(builder.build_cartesian_2d(0.0..t_max, (lo..hi).log_scale())?);
        }
    }
    root.present()?;
    Ok(())
}

/// A run's `index.html`: its summary as a table (from the summary JSON: numbers, text,
/// lists) and every plot, linked from the files written beside it. Deterministic like
/// the rest of the report.
pub fn index_html(title: &str, summary_json: &str, files: &[&str], plots: &[&str]) -> String {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut rows = String::new();
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(summary_json) {
        for (key, value) in fields {
            let shown = match &value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) if a.is_empty() => "none".to_string(),
                other => other.to_string(),
            };
            let _ = writeln!(
                rows,
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(&key.replace('_', " ")),
                escape(&shown)
            );
        }
    }
    let links: Vec<String> =
        files.iter().map(|f| format!("<a href=\"{0}\">{0}</a>", escape(f))).collect();
    let mut figures = String::new();
    for name in plots {
        let _ = writeln!(figures, "<figure><img src=\"{0}\" alt=\"{0}\"></figure>", escape(name));
    }
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n\
         <style>body{{font:14px/1.4 sans-serif;margin:2em;max-width:1600px}}\
         table{{border-collapse:collapse}}th,td{{text-align:left;padding:.15em .8em;border-bottom:1px solid #ddd;vertical-align:top}}\
         td{{font-family:monospace;max-width:60em;overflow-wrap:anywhere}}\
         figure{{display:inline-block;margin:.5em}}img{{max-width:100%}}</style>\n</head>\n<body>\n\
         <h1>{t}</h1>\n<p>Files: {links}.</p>\n{figures}\
         <h2>Summary</h2>\n<table>\n{rows}</table>\n</body>\n</html>\n",
        t = escape(title),
        links = links.join(", "),
    )
}

/// One metric of a run over time, for comparing seeds: (file name, title, y label,
/// scale, values per sample).
pub type SeedSeries = (&'static str, &'static str, &'static str, Scale, Vec<f64>);

/// Runs of one scenario with several seeds, one metric: the median per sample as a line
/// and a band from the least to the most. Samples are aligned by index (every run of a
/// scenario samples alike); runs shorter than `t` cut the chart at their length.
pub fn across_seeds(
    title: &str,
    y_label: &str,
    scale: Scale,
    t: &[f64],
    runs: &[Vec<f64>],
    markers: &[(f64, String)],
) -> String {
    let n = runs.iter().map(Vec::len).min().unwrap_or(0).min(t.len());
    let (mut lo, mut mid, mut hi) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        let m = v.len();
        lo.push(v[0]);
        hi.push(v[m - 1]);
        mid.push(if m % 2 == 1 { v[m / 2] } else { (v[m / 2 - 1] + v[m / 2]) / 2.0 });
    }
    chart(&Chart {
        title: format!("{title} ({} seeds)", runs.len()),
        x_label: TIME,
        y_label,
        scale,
        t: &t[..n],
        series: vec![("median", mid)],
        markers,
        band: Some(("least to most", lo, hi)),
    })
}
