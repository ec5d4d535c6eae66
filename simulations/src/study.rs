//! Studies: many runs of a scenario, compared. A scenario with one setting changed (a
//! sweep, `botclaw sim --set KEY=V1,V2,...`), the statistics of each metric across seeds
//! (`--seeds N`), and a sweep's CSV and plots. Pure: the command line runs the
//! simulations and writes the files.

use std::fmt::Write as _;

use crate::report::{chart, Chart, Scale};
use crate::scenario::Scenario;

/// `KEY=V1,V2,...` of `--set`: the dotted key and its values, in order.
pub fn parse_set(arg: &str) -> Result<(String, Vec<String>), String> {
    let (key, values) =
        arg.split_once('=').ok_or_else(|| format!("--set {arg:?}: expected KEY=V1,V2,..."))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(format!("--set {arg:?}: the key is empty or has an empty part"));
    }
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().any(String::is_empty) {
        return Err(format!("--set {arg:?}: a value is empty"));
    }
    Ok((key.to_string(), values))
}

/// The scenario of `text` with the dotted `key` set to `value` (a TOML value: a number,
/// a boolean, a quoted string; anything else is taken as a string). The result is checked
/// like a scenario file: an unknown key or a bad value is an error naming it.
pub fn with_setting(text: &str, key: &str, value: &str) -> Result<Scenario, String> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().expect("parse_set refuses empty keys");
    let mut table = &mut doc;
    for part in path {
        let next =
            table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = next.as_table_mut().ok_or_else(|| format!("{key}: {part} is not a table"))?;
    }
    table.insert(last.to_string(), parsed);
    let scenario: Scenario = toml::Value::Table(doc)
        .try_into()
        .map_err(|e: toml::de::Error| format!("{key} = {value}: {}", e.to_string().trim_end()))?;
    scenario.validate().map_err(|e| format!("{key} = {value}: {e}"))?;
    Ok(scenario)
}

/// A run's metrics: every number at the top level of its summary JSON but the seed, by
/// name (in the summary's order, which is by name).
pub fn metrics(summary_json: &str) -> Vec<(String, f64)> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(summary_json) else {
        return Vec::new();
    };
    fields
        .into_iter()
        .filter(|(k, _)| k != "seed")
        .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
        .collect()
}

/// One metric over several seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// The 95% confidence interval of the mean (Student's t; the mean itself for one run).
    pub ci95: (f64, f64),
}

/// Two-sided 95% quantiles of Student's t by degrees of freedom 1..=30 (standard tables).
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// The quantile for `df` degrees of freedom; between the tabled 30, 40, 60 and 120, the
/// smaller df's (wider, so the interval is never too narrow).
fn t95(df: usize) -> f64 {
    match df {
        0 => f64::NAN,
        1..=30 => T95[df - 1],
        31..=39 => 2.042,
        40..=59 => 2.021,
        60..=119 => 2.000,
        _ => 1.980,
    }
}

pub fn stats(values: &[f64]) -> Stats {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        let nan = f64::NAN;
        return Stats { n, median: nan, min: nan, max: nan, mean: nan, ci95: (nan, nan) };
    }
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let mean = v.iter().sum::<f64>() / n as f64;
    let ci95 = if n < 2 {
        (mean, mean)
    } else {
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half = t95(n - 1) * (var / n as f64).sqrt();
        (mean - half, mean + half)
    };
    Stats { n, median, min: v[0], max: v[n - 1], mean, ci95 }
}

/// A number for a table: integers as such, others with 3 significant decimals.
fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Every metric any of the runs reports, by name (a run may lack one: a crash time of a
/// run where no crash was detected is null, not a number).
pub fn metric_names<'a>(runs: impl IntoIterator<Item = &'a Vec<(String, f64)>>) -> Vec<&'a str> {
    let names: std::collections::BTreeSet<&str> =
        runs.into_iter().flatten().map(|(k, _)| k.as_str()).collect();
    names.into_iter().collect()
}

/// The per-metric table of several runs (one per seed), Markdown: median, min, max and
/// the 95% interval of the mean, over the runs that report the metric.
pub fn seeds_table(runs: &[Vec<(String, f64)>]) -> String {
    let mut out = format!(
        "| metric | median | min | max | mean, 95% interval ({} seeds) |\n|---|---|---|---|---|\n",
        runs.len()
    );
    for name in metric_names(runs) {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.iter().find(|(k, _)| k == name).map(|(_, v)| *v))
            .collect();
        let s = stats(&values);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} [{}, {}] |",
            num(s.median),
            num(s.min),
            num(s.max),
            num(s.mean),
            num(s.ci95.0),
            num(s.ci95.1)
        );
    }
    out
}

/// One run of a sweep: the value of the swept key, the seed, the run's metrics.
pub type SweepRun = (String, u64, Vec<(String, f64)>);

/// A sweep as CSV: one row per (value, seed), a column per metric any run reports (empty
/// where a run does not).
pub fn sweep_csv(key: &str, runs: &[SweepRun]) -> String {
    let names = metric_names(runs.iter().map(|(_, _, m)| m));
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = format!("{},seed,{}\n", quote(key), names.join(","));
    for (value, seed, metrics) in runs {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                metrics.iter().find(|(k, _)| k == n).map(|(_, v)| v.to_string()).unwrap_or_default()
            })
            .collect();
        let _ = writeln!(out, "{},{seed},{}", quote(value), cells.join(","));
    }
    out
}

/// One metric of a sweep against the swept value: the median over seeds as a line over a
/// band from the least to the most. Values that are not all numbers are placed by their
/// position in the sweep.
pub fn sweep_chart(scenario: &str, key: &str, metric: &str, runs: &[SweepRun]) -> String {
    let mut values: Vec<&str> = Vec::new();
    for (v, _, _) in runs {
        if !values.contains(&v.as_str()) {
            values.push(v);
        }
    }
    let numeric: Option<Vec<f64>> = values.iter().map(|v| v.parse::<f64>().ok()).collect();
    let (x, x_label) = match numeric {
        Some(x) => (x, key.to_string()),
        None => (
            (0..values.len()).map(|i| i as f64).collect(),
            format!("{key} (position in the sweep)"),
        ),
    };
    let (mut lo, mut mid, mut hi) = (Vec::new(), Vec::new(), Vec::new());
    for v in &values {
        let per_seed: Vec<f64> = runs
            .iter()
            .filter(|(value, _, _)| value == v)
            .filter_map(|(_, _, m)| m.iter().find(|(k, _)| k == metric).map(|(_, x)| *x))
            .collect();
        let s = stats(&per_seed);
        lo.push(s.min);
        mid.push(s.median);
        hi.push(s.max);
    }
    let seeds = runs.iter().filter(|(v, _, _)| *v == values[0]).count();
    chart(&Chart {
        title: format!("{scenario}: {metric} by {key} ({seeds} seeds)"),
        x_label: &x_label,
        y_label: metric,
        scale: Scale::Linear,
        t: &x,
        series: vec![("median", mid)],
        markers: &[],
        band: Some(("least to most", lo, hi)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"s\"\nnodes = 5\n[gossip]\nprobe_period_ms = 1000\n";

    #[test]
    fn a_setting_changes_one_field_and_a_bad_one_names_itself() {
        let s = with_setting(BASE, "gossip.probe_period_ms", "250").unwrap();
        assert_eq!(s.gossip.probe_period_ms, 250);
        assert_eq!(s.nodes, 5);
        assert_eq!(with_setting(BASE, "nodes", "12").unwrap().nodes, 12);
        assert_eq!(with_setting(BASE, "replication.factor", "3").unwrap().replication.factor, 3);
        let unknown = with_setting(BASE, "gossip.probe_perod_ms", "250").unwrap_err();
        assert!(unknown.contains("probe_perod_ms"), "{unknown}");
        let bad = with_setting(BASE, "nodes", "0").unwrap_err();
        assert!(bad.contains("nodes"), "{bad}");
        let not_table = with_setting(BASE, "nodes.x", "1").unwrap_err();
        assert!(not_table.contains("not a table"), "{not_table}");
        assert_eq!(
            parse_set("nodes=5, 10,20").unwrap(),
            ("nodes".to_string(), vec!["5".into(), "10".into(), "20".into()])
        );
        assert!(
            parse_set("nodes").is_err() && parse_set("=1").is_err() && parse_set("a=1,").is_err()
        );
    }

    #[test]
    fn stats_give_the_median_range_and_a_t_interval() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.n, s.median, s.min, s.max, s.mean), (4, 2.5, 1.0, 10.0, 4.0));
        // sd = sqrt(((1)+(4)+(9)+(36))/3) = sqrt(50/3); half = t(3) * sd / 2.
        let half = 3.182 * (50.0f64 / 3.0).sqrt() / 2.0;
        assert!((s.ci95.0 - (4.0 - half)).abs() < 1e-9 && (s.ci95.1 - (4.0 + half)).abs() < 1e-9);
        assert_eq!(t95(10), 2.228);
        assert_eq!(t95(45), 2.021);
        let one = stats(&[7.0]);
        assert_eq!((one.median, one.ci95), (7.0, (7.0, 7.0)));
        assert_eq!(stats(&[]).n, 0);
    }

    #[test]
    fn metrics_tables_and_sweeps_read_every_number() {
        let a =
            metrics("{\"a_ms\": 2.5, \"lost\": 0, \"name\": \"x\", \"seed\": 1, \"list\": [1]}");
        assert_eq!(a, vec![("a_ms".to_string(), 2.5), ("lost".to_string(), 0.0)]);
        let b = metrics("{\"a_ms\": 3.5, \"lost\": 0, \"seed\": 2, \"late_s\": 1.5}");
        let table = seeds_table(&[a.clone(), b.clone()]);
        assert!(table.contains("| a_ms | 3 | 2.500 | 3.500 | 3 [-3.353, 9.353] |"), "{table}");
        assert!(table.contains("| lost | 0 | 0 | 0 | 0 [0, 0] |"), "{table}");
        let runs: Vec<SweepRun> =
            vec![("100".into(), 1, a.clone()), ("100".into(), 2, b.clone()), ("200".into(), 1, b)];
        let csv = sweep_csv("gossip.probe_period_ms", &runs);
        // A metric only a later run reports still gets its column.
        assert_eq!(csv.lines().next(), Some("gossip.probe_period_ms,seed,a_ms,late_s,lost"));
        assert_eq!(csv.lines().nth(1), Some("100,1,2.5,,0"));
        assert_eq!(csv.lines().nth(3), Some("200,1,3.5,1.5,0"));
        assert!(table.contains("| late_s | 1.500 | 1.500 | 1.500 |"), "{table}");
        let svg = sweep_chart("s", "gossip.probe_period_ms", "a_ms", &runs);
        assert!(
            svg.starts_with("<svg") && svg.contains("a_ms by gossip.probe_period_ms (2 seeds)")
        );
    }
}
