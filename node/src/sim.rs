//! `botclaw sim`: runs a simulation scenario (see `botclaw_sim`) and writes its reports.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use botclaw_sim::scenario::Scenario;
use clap::{Args, ValueEnum};

/// Which replication the run simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// The authoritative placement protocol: the real controller (raft-rs), planner and
    /// ownership machines of every node (what a node runs by default).
    Map,
    /// The ring-based model of the older mode (`[controller] authoritative = false`):
    /// each node's own placement view, acquire from replicas.
    Ring,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Scenario file (TOML; see simulations/scenarios/).
    #[arg(long)]
    scenario: PathBuf,
    /// Seed of the first run (default: the scenario's `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Runs with consecutive seeds.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Directory for the reports: DIR/<scenario>-<model>-seed<S>/{summary.json, series.csv,
    /// *.svg}.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// What to simulate: the controller's map (what nodes run by default) or the
    /// ring-based replication of the older mode.
    #[arg(long, value_enum, default_value = "map")]
    model: Model,
}

pub fn run(args: SimArgs) -> ExitCode {
    match run_all(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs every seed; false if a checker failed in any.
fn run_all(args: &SimArgs) -> Result<bool> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("cannot read {}", args.scenario.display()))?;
    let scenario = Scenario::from_toml(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    let first = args.seed.unwrap_or(scenario.seed);
    let mut all_ok = true;
    // Per seed: the sample times and the metrics compared across seeds.
    let mut across: Vec<(Vec<f64>, Vec<botclaw_sim::report::SeedSeries>)> = Vec::new();
    for seed in first..first.saturating_add(args.seeds.max(1)) {
        println!("scenario {} seed {seed}", scenario.name);
        let started = std::time::Instant::now();
        let (quiet, tty) = (args.quiet, std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let mut next_line = 0.1;
        let progress = |done: f64| {
            if quiet {
                return;
            }
            if tty {
                let bar = ((done * 30.0) as usize).min(30);
                eprint!("\r[{}{}] {:3.0}%", "#".repeat(bar), ".".repeat(30 - bar), done * 100.0);
                let _ = std::io::stderr().flush();
            } else if done >= next_line {
                // Not a terminal (a log, CI): a line every 10%.
                let tenths = (done * 10.0).floor();
                eprintln!("  {:.0}% of simulated time", tenths * 10.0);
                next_line = (tenths + 1.0) / 10.0;
            }
        };
        let model = match args.model {
            Model::Map => "map",
            Model::Ring => "ring",
        };
        let dir = args.out.join(format!("{}-{model}-seed{seed}", scenario.name));
        let (failures, simulated_s) = match args.model {
            Model::Map => {
                let report = botclaw_sim::by_map::run(scenario.clone(), seed, progress);
                finish_line(quiet, tty);
                write_reports(&dir, &report.to_json(), &report.to_csv(), report.plots())?;
                across.push(report.seed_series());
                println!(
                    "  by the map: {} writes acknowledged of {} sent ({} refused; {} requests \
                     unrouted), p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {} lost",
                    report.writes_acknowledged,
                    report.writes_submitted,
                    report.writes_failed,
                    report.requests_unrouted,
                    report.latency_ms_p50,
                    report.latency_ms_p99,
                    report.latency_ms_p999,
                    report.writes_lost
                );
                println!(
                    "  {} entries, {} leaders, {} learners added, {} owner changes; \
                     {:.1} shard-s unavailable, {} shards unavailable at the end",
                    report.entries,
                    report.leader_changes,
                    report.learners_added,
                    report.owner_changes,
                    report.unavailable_shard_s,
                    report.unavailable_shards_end
                );
                (report.failures, report.simulated_s)
            }
            Model::Ring => {
                let report = botclaw_sim::run(scenario.clone(), seed, progress);
                finish_line(quiet, tty);
                write_reports(&dir, &report.to_json(), &report.to_csv(), report.plots())?;
                across.push(report.seed_series());
                println!(
                    "  by the ring: {} turns acknowledged of {} sent, p50 {:.2} ms, p99 {:.2} ms, \
                     p99.9 {:.2} ms; load max/avg {:.3} (worst {:.3}); {} shards moved; {} lost",
                    report.turns_acknowledged,
                    report.turns_sent,
                    report.latency_ms_p50,
                    report.latency_ms_p99,
                    report.latency_ms_p999,
                    report.load_max_over_avg_mean,
                    report.load_max_over_avg_max,
                    report.shards_moved,
                    report.turns_lost
                );
                (report.failures, report.simulated_s)
            }
        };
        let wall = started.elapsed().as_secs_f64();
        println!(
            "  {simulated_s} simulated s in {wall:.2} s wall ({:.1}x real time); reports in {}",
            simulated_s as f64 / wall.max(1e-9),
            dir.display()
        );
        if !failures.is_empty() {
            all_ok = false;
            println!("  CHECKER FAILED ({} failures), first: {}", failures.len(), failures[0]);
            println!(
                "  reproduce: botclaw sim --scenario {} --seed {seed} --model {model}",
                args.scenario.display()
            );
        }
    }
    if across.len() > 1 {
        let model = match args.model {
            Model::Map => "map",
            Model::Ring => "ring",
        };
        let last = first + across.len() as u64 - 1;
        let dir = args.out.join(format!("{}-{model}-seeds{first}-{last}", scenario.name));
        write_across_seeds(&dir, &scenario, first, &across)?;
        println!(
            "  across {} seeds: median and least-to-most plots in {}",
            across.len(),
            dir.display()
        );
    }
    Ok(all_ok)
}

/// The plots of several seeds' runs together (median, and a band from the least to the
/// most), with an `index.html` and a `summary.json` naming the seeds.
fn write_across_seeds(
    dir: &Path,
    scenario: &Scenario,
    first: u64,
    runs: &[(Vec<f64>, Vec<botclaw_sim::report::SeedSeries>)],
) -> Result<()> {
    let t = runs.iter().map(|(t, _)| t).min_by_key(|t| t.len()).cloned().unwrap_or_default();
    let markers = scenario.markers();
    let mut plots = Vec::new();
    for (k, (file, title, y_label, scale, _)) in runs[0].1.iter().enumerate() {
        let values: Vec<Vec<f64>> = runs.iter().map(|(_, series)| series[k].4.clone()).collect();
        let title = format!("{}: {title}", scenario.name);
        let svg = botclaw_sim::report::across_seeds(&title, y_label, *scale, &t, &values, &markers);
        plots.push((*file, svg));
    }
    let seeds: Vec<u64> = (first..first + runs.len() as u64).collect();
    let summary = serde_json::json!({
        "scenario": scenario.name,
        "seeds": seeds,
        "runs": runs.len(),
        "plots": "the median per sample, and a band from the least to the most over the seeds",
    });
    let json = serde_json::to_string_pretty(&summary)? + "\n";
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names: Vec<&str> = plots.iter().map(|(name, _)| *name).collect();
    let title = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::write(dir.join("summary.json"), &json)?;
    let page = botclaw_sim::report::index_html(&title, &json, &["summary.json"], &names);
    std::fs::write(dir.join("index.html"), page)?;
    for (name, svg) in plots {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}

fn finish_line(quiet: bool, tty: bool) {
    if !quiet && tty {
        eprintln!();
    }
}

fn write_reports(
    dir: &Path,
    json: &str,
    csv: &str,
    plots: Vec<(&'static str, String)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, body).with_context(|| format!("cannot write {}", path.display()))
    };
    write("summary.json", json)?;
    write("series.csv", csv)?;
    let names: Vec<&str> = plots.iter().map(|(name, _)| *name).collect();
    let title = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let files = ["summary.json", "series.csv"];
    write("index.html", &botclaw_sim::report::index_html(&title, json, &files, &names))?;
    for (name, svg) in plots {
        write(name, &svg)?;
    }
    Ok(())
}
