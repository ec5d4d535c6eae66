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
    pub p99_ms: f64,
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
}

impl Report {
    pub fn to_json(&self) -> String {
        json_line(self)
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "t_s,turns_per_s,load_max_over_avg,p99_ms,nodes_running,members_up_min,members_up_max,failed_attempts,moved_shards\n",
        );
        for s in &self.samples {
            let _ = writeln!(
                out,
                "{:.3},{:.1},{:.4},{:.3},{},{},{},{},{}",
                s.t_s,
                s.turns_per_s,
                s.load_max_over_avg,
                s.p99_ms,
                s.nodes_running,
                s.members_up_min,
                s.members_up_max,
                s.failed_attempts,
                s.moved_shards
            );
        }
        out
    }

    /// The plots: (file name, SVG).
    pub fn plots(&self) -> Vec<(&'static str, String)> {
        let t: Vec<f64> = self.samples.iter().map(|s| s.t_s).collect();
        let series = |f: fn(&Sample) -> f64| -> Vec<f64> { self.samples.iter().map(f).collect() };
        vec![
            (
                "balance.svg",
                line_chart(
                    &format!("{}: load balance", self.scenario),
                    "busiest node / average",
                    &t,
                    &[("max/avg", series(|s| s.load_max_over_avg))],
                ),
            ),
            (
                "latency.svg",
                line_chart(
                    &format!("{}: turn latency", self.scenario),
                    "p99 (ms)",
                    &t,
                    &[("p99", series(|s| s.p99_ms))],
                ),
            ),
            (
                "membership.svg",
                line_chart(
                    &format!("{}: membership", self.scenario),
                    "nodes",
                    &t,
                    &[
                        ("running", series(|s| s.nodes_running as f64)),
                        ("seen up (min)", series(|s| s.members_up_min as f64)),
                        ("seen up (max)", series(|s| s.members_up_max as f64)),
                    ],
                ),
            ),
        ]
    }
}

const COLORS: [&str; 3] = ["#1f77b4", "#d62728", "#2ca02c"];

/// A minimal line chart: axes with min/max labels, one polyline per series, a legend.
/// A report as pretty JSON ending in a newline.
pub(crate) fn json_line(report: &impl Serialize) -> String {
    let mut json = serde_json::to_string_pretty(report).expect("reports serialize");
    json.push('\n');
    json
}

pub(crate) fn line_chart(
    title: &str,
    y_label: &str,
    t: &[f64],
    series: &[(&str, Vec<f64>)],
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 360.0, 70.0, 20.0, 40.0, 40.0);
    let t_max = t.iter().copied().fold(0.0, f64::max).max(1e-9);
    let values = series.iter().flat_map(|(_, v)| v.iter().copied());
    let y_max = values.clone().fold(f64::MIN, f64::max).max(0.0);
    let y_min = values.fold(f64::MAX, f64::min).min(y_max).min(0.0);
    let span = (y_max - y_min).max(1e-9);
    let x = |v: f64| left + (w - left - right) * v / t_max;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - (v - y_min) / span);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{left}" y="20" font-size="14">{}</text>"#, escape(title));
    let (x0, x1, y0, y1) = (left, w - right, top, h - bottom);
    let _ =
        writeln!(svg, r#"<path d="M{x0} {y0} L{x0} {y1} L{x1} {y1}" stroke="black" fill="none"/>"#);
    let _ = writeln!(svg, r#"<text x="4" y="{}">{y_max:.2}</text>"#, y0 + 4.0);
    let _ = writeln!(svg, r#"<text x="4" y="{}">{y_min:.2}</text>"#, y1);
    let _ = writeln!(svg, r#"<text x="4" y="{}">{}</text>"#, (y0 + y1) / 2.0, escape(y_label));
    let _ =
        writeln!(svg, r#"<text x="{x1}" y="{}" text-anchor="end">{t_max:.0} s</text>"#, h - 12.0);
    let _ = writeln!(svg, r#"<text x="{x0}" y="{}">0 s</text>"#, h - 12.0);
    for (k, (name, values)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> =
            t.iter().zip(values).map(|(&tv, &v)| format!("{:.1},{:.1}", x(tv), y(v))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" stroke="{color}" stroke-width="1.5" fill="none"/>"#,
            points.join(" ")
        );
        let ly = top + 14.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{ly}" fill="{color}" text-anchor="end">{}</text>"#,
            x1,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
