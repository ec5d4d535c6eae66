//! `botclaw sim`: runs a simulation scenario (see `botclaw_sim`) and writes its reports.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use botclaw_sim::scenario::Scenario;
use botclaw_sim::study;
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
    /// Runs with consecutive seeds; with more than one, a table of every metric across
    /// them (median, min, max, the mean's 95% interval) and plots of them together.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// A sweep: KEY=V1,V2,... runs the scenario with its dotted KEY (e.g.
    /// gossip.probe_period_ms, replication.factor, nodes) set to each value, every seed
    /// each, and writes DIR/<scenario>-<model>-sweep-<KEY>/{sweep.csv, *.svg, index.html}.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    set: Option<String>,
    /// Runs at once, each on its own thread (default: the machine's cores). Each run is
    /// still byte-identical for its seed.
    #[arg(long)]
    jobs: Option<usize>,
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

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Map => "map",
            Model::Ring => "ring",
        }
    }
}

/// One run to make: the swept value (if any), its scenario, and the seed.
struct Job {
    value: Option<String>,
    scenario: Scenario,
    seed: u64,
}

/// What a run gave.
struct Outcome {
    /// What it prints (its figures, where its reports went).
    lines: String,
    failures: Vec<String>,
    summary: String,
    series: (Vec<f64>, Vec<botclaw_sim::report::SeedSeries>),
}

/// Runs every job (several at once if `--jobs` allows); false if a checker failed in any.
fn run_all(args: &SimArgs) -> Result<bool> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("cannot read {}", args.scenario.display()))?;
    let scenario = Scenario::from_toml(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    let first = args.seed.unwrap_or(scenario.seed);
    let seeds: Vec<u64> = (first..first.saturating_add(args.seeds.max(1))).collect();
    let sweep =
        args.set.as_deref().map(study::parse_set).transpose().map_err(anyhow::Error::msg)?;
    let mut jobs = Vec::new();
    match &sweep {
        None => jobs.extend(seeds.iter().map(|&seed| Job {
            value: None,
            scenario: scenario.clone(),
            seed,
        })),
        Some((key, values)) => {
            for value in values {
                let changed = study::with_setting(&text, key, value)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
                for &seed in &seeds {
                    let value = Some(value.clone());
                    jobs.push(Job { value, scenario: changed.clone(), seed });
                }
            }
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.jobs.unwrap_or(cores).clamp(1, jobs.len());
    let outcomes = run_jobs(args, sweep.as_ref().map(|(k, _)| k.as_str()), &jobs, workers)?;

    let model = args.model.name();
    let mut all_ok = true;
    let mut swept: Vec<study::SweepRun> = Vec::new();
    for (job, outcome) in jobs.iter().zip(&outcomes) {
        print!("{}", outcome.lines);
        if !outcome.failures.is_empty() {
            all_ok = false;
            println!(
                "  CHECKER FAILED ({} failures), first: {}",
                outcome.failures.len(),
                outcome.failures[0]
            );
            let set = match (&sweep, &job.value) {
                (Some((key, _)), Some(v)) => format!(" --set {key}={v}"),
                _ => String::new(),
            };
            println!(
                "  reproduce: botclaw sim --scenario {} --seed {}{set} --model {model}",
                args.scenario.display(),
                job.seed
            );
        }
        let value = job.value.clone().unwrap_or_default();
        swept.push((value, job.seed, study::metrics(&outcome.summary)));
    }
    // Per value (one group without a sweep): the seeds compared.
    if seeds.len() > 1 {
        for (group, chunk) in jobs.chunks(seeds.len()).zip(outcomes.chunks(seeds.len())) {
            let tag = run_tag(sweep.as_ref().map(|(k, _)| k.as_str()), group[0].value.as_deref());
            let last = first + seeds.len() as u64 - 1;
            let dir = args.out.join(format!("{}-{model}{tag}-seeds{first}-{last}", scenario.name));
            let series: Vec<_> = chunk.iter().map(|o| o.series.clone()).collect();
            let runs: Vec<Vec<(String, f64)>> =
                chunk.iter().map(|o| study::metrics(&o.summary)).collect();
            let table = study::seeds_table(&runs);
            write_across_seeds(&dir, &group[0].scenario, first, &series, &table)?;
            let shown = match (&sweep, &group[0].value) {
                (Some((key, _)), Some(v)) => format!(" ({key} = {v})"),
                _ => String::new(),
            };
            println!("\nacross {} seeds{shown}:\n\n{table}", seeds.len());
            println!("  median and least-to-most plots, and this table, in {}", dir.display());
        }
    }
    if let Some((key, _)) = &sweep {
        let dir = args.out.join(format!("{}-{model}-sweep-{key}", scenario.name));
        write_sweep(&dir, &scenario.name, key, &swept)?;
        println!(
            "\nsweep of {key}: {} runs, one CSV row each, and plots of the median with the \
             least-to-most band in {}",
            swept.len(),
            dir.display()
        );
    }
    Ok(all_ok)
}

/// What a swept run's directory names carry: `-KEY=VALUE`, or nothing.
fn run_tag(key: Option<&str>, value: Option<&str>) -> String {
    match (key, value) {
        (Some(k), Some(v)) => format!("-{k}={v}"),
        _ => String::new(),
    }
}

/// Runs the jobs on `workers` threads, each taking the next job not yet taken; the
/// outcomes come back in the jobs' order. A lone worker draws the progress bar.
fn run_jobs(
    args: &SimArgs,
    key: Option<&str>,
    jobs: &[Job],
    workers: usize,
) -> Result<Vec<Outcome>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<std::sync::Mutex<Option<Result<Outcome>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let quiet = args.quiet || workers > 1;
                let outcome = run_one(args, key, job, quiet);
                if workers > 1 && !args.quiet {
                    let value = run_tag(key, job.value.as_deref());
                    eprintln!("  run {}/{} done (seed {}{value})", i + 1, jobs.len(), job.seed);
                }
                *done[i].lock().expect("outcome lock") = Some(outcome);
            });
        }
    });
    done.into_iter()
        .map(|slot| slot.into_inner().expect("outcome lock").expect("every job ran"))
        .collect()
}

/// One run: simulate, write its reports, say what it found.
fn run_one(args: &SimArgs, key: Option<&str>, job: &Job, quiet: bool) -> Result<Outcome> {
    let (scenario, seed) = (&job.scenario, job.seed);
    let model = args.model.name();
    let tag = run_tag(key, job.value.as_deref());
    let mut lines = String::new();
    let shown = match (key, &job.value) {
        (Some(k), Some(v)) => format!(" ({k} = {v})"),
        _ => String::new(),
    };
    let _ = writeln!(lines, "scenario {}{shown} seed {seed}", scenario.name);
    let started = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
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
    let dir = args.out.join(format!("{}-{model}{tag}-seed{seed}", scenario.name));
    let (failures, simulated_s, summary, series) = match args.model {
        Model::Map => {
            let report = botclaw_sim::by_map::run(scenario.clone(), seed, progress);
            finish_line(quiet, tty);
            let summary = report.to_json();
            write_reports(&dir, &summary, &report.to_csv(), report.plots())?;
            let _ = writeln!(
                lines,
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
            let _ = writeln!(
                lines,
                "  {} entries ({} changed nothing; {} stale proposals left out), {} leaders, \
                 {} learners added, {} owner changes; {:.1} shard-s unavailable, {} shards \
                 unavailable at the end",
                report.entries,
                report.entries_without_effect,
                report.proposals_stale,
                report.leader_changes,
                report.learners_added,
                report.owner_changes,
                report.unavailable_shard_s,
                report.unavailable_shards_end
            );
            let last = report
                .load_moves_last_s
                .map_or(String::new(), |s| format!(", the last at {s:.1} s"));
            let _ = writeln!(
                lines,
                "  load: busiest owner over the average {:.3} (mean), {:.3} (last 10 s); {} \
                 load-driven moves{last}",
                report.load_max_over_avg_mean, report.load_max_over_avg_end, report.load_moves,
            );
            (report.failures.clone(), report.simulated_s, summary, report.seed_series())
        }
        Model::Ring => {
            let report = botclaw_sim::run(scenario.clone(), seed, progress);
            finish_line(quiet, tty);
            let summary = report.to_json();
            write_reports(&dir, &summary, &report.to_csv(), report.plots())?;
            let _ = writeln!(
                lines,
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
            (report.failures.clone(), report.simulated_s, summary, report.seed_series())
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let _ = writeln!(
        lines,
        "  {simulated_s} simulated s in {wall:.2} s wall ({:.1}x real time); reports in {}",
        simulated_s as f64 / wall.max(1e-9),
        dir.display()
    );
    Ok(Outcome { lines, failures, summary, series })
}

/// A sweep's CSV (a row per run), one plot per headline metric the runs report, and an
/// `index.html` with them.
fn write_sweep(dir: &Path, scenario: &str, key: &str, runs: &[study::SweepRun]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("sweep.csv"), study::sweep_csv(key, runs))?;
    let reported = study::metric_names(runs.iter().map(|(_, _, m)| m));
    let mut names = Vec::new();
    for metric in SWEEP_PLOTS.iter().filter(|m| reported.contains(m)) {
        let file = format!("{metric}.svg");
        std::fs::write(dir.join(&file), study::sweep_chart(scenario, key, metric, runs))?;
        names.push(file);
    }
    let seeds = runs.iter().filter(|(v, _, _)| *v == runs[0].0).count();
    let summary = serde_json::json!({
        "scenario": scenario,
        "swept": key,
        "runs": runs.len(),
        "seeds_per_value": seeds,
        "plots": "the median over the seeds per value, and a band from the least to the most",
    });
    let json = serde_json::to_string_pretty(&summary)? + "\n";
    std::fs::write(dir.join("summary.json"), &json)?;
    let title = format!("{scenario}: sweep of {key}");
    let plots: Vec<&str> = names.iter().map(String::as_str).collect();
    let page =
        botclaw_sim::report::index_html(&title, &json, &["sweep.csv", "summary.json"], &plots);
    std::fs::write(dir.join("index.html"), page)?;
    Ok(())
}

/// The metrics a sweep plots, where a run reports them (both models' names).
const SWEEP_PLOTS: [&str; 10] = [
    "detected_s_median",
    "reassigned_s_median",
    "latency_ms_p50",
    "latency_ms_p99",
    "writes_acknowledged",
    "turns_acknowledged",
    "unavailable_shard_s",
    "load_max_over_avg_max",
    "writes_lost",
    "turns_lost",
];

/// The plots of several seeds' runs together (median, and a band from the least to the
/// most), with an `index.html` and a `summary.json` naming the seeds.
fn write_across_seeds(
    dir: &Path,
    scenario: &Scenario,
    first: u64,
    runs: &[(Vec<f64>, Vec<botclaw_sim::report::SeedSeries>)],
    table: &str,
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
    std::fs::write(dir.join("seeds.md"), table)?;
    let files = ["summary.json", "seeds.md"];
    let page = botclaw_sim::report::index_html(&title, &json, &files, &names);
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
