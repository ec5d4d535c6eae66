//! The client tools against a real node: `botclaw chat` driven through stdin, and
//! `botclaw bench --json` (a functional check of the report, not a performance test).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use botclaw_tests::*;

#[test]
fn chat_repl_talks_to_a_bot() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], Duration::from_secs(20));
    let mut chat = Command::new(botclaw_bin())
        .args([
            "chat",
            "--connect",
            &c.nodes[0].ports.client.to_string(),
            "--conv",
            "repl-1",
            "--bot",
            "shop",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = "I want to return an order\n4711\nyes\n/history\n/topology\n/quit\n";
    chat.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let pid = chat.id();
    let out = poll(Duration::from_secs(20), || chat.try_wait().ok().flatten());
    if out.is_none() {
        send_signal(pid, libc::SIGKILL);
    }
    let out = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("bot> Sure. What is your order number?"), "{stdout}");
    assert!(stdout.contains("Return order #4711?"), "{stdout}");
    assert!(stdout.contains("#4711 confirmed"), "{stdout}");
    assert!(stdout.contains("(turn 3 on n0)"), "{stdout}");
    assert!(stdout.contains("#1 you: I want to return an order"), "{stdout}");
    assert!(stdout.contains(&format!("n0 {}", c.nodes[0].ports.client)), "{stdout}");
}

#[test]
fn bench_reports_json() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], Duration::from_secs(20));
    let out = Command::new(botclaw_bin())
        .args(["bench", "--json", "--baseline-echo", "--connections", "4", "--conversations", "50"])
        .args(["--turns", "2000", "--pipeline", "4", "--skew", "1.1"])
        .args(["--connect", &c.nodes[0].ports.client.to_string()])
        .args(["--admin", &c.nodes[0].ports.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cluster"]["turns"], 2000, "{report:#}");
    assert!(report["cluster"]["errors"].as_object().unwrap().is_empty(), "{report:#}");
    assert_eq!(report["baseline"]["turns"], 2000);
    let lat = &report["cluster"]["latency_us"];
    assert!(lat["p50"].as_u64().unwrap() <= lat["p99"].as_u64().unwrap());
    assert_eq!(report["cluster"]["local_us"]["count"], 2000, "one node runs every turn itself");
    assert!(report["ratios"]["throughput"].as_f64().unwrap() > 0.0);
    let active = report["memory"]["active_after"].as_u64().unwrap();
    assert!((1..=50).contains(&active), "{report:#}");
    // The node counted what the bench sent.
    assert_eq!(metric(&c.nodes[0].metrics(), "botclaw_turns_total"), 2000.0);
}

/// `botclaw sim`: prints the seed, writes the JSON summary, CSV series and SVG plots, and
/// the same scenario and seed give byte-identical files (the determinism check), by the
/// controller's map (the default) and by the ring; a bad scenario file exits 2 naming the
/// field.
#[test]
fn sim_reports_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../simulations/scenarios/steady.toml");
    let run = |out: &str, model: &str| {
        let out_dir = dir.path().join(out);
        let o = Command::new(botclaw_bin())
            .args(["sim", "--scenario", scenario, "--seed", "3", "--model", model, "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("seed 3"), "{stdout}");
        out_dir.join(format!("steady-{model}-seed3"))
    };
    let plots: [(&str, &[&str]); 2] = [
        (
            "map",
            &["throughput.svg", "latency.svg", "balance.svg", "placement.svg", "membership.svg"],
        ),
        ("ring", &["balance.svg", "latency.svg", "membership.svg"]),
    ];
    for (model, svgs) in plots {
        let (a, b) = (run(&format!("{model}-a"), model), run(&format!("{model}-b"), model));
        for file in ["summary.json", "series.csv", "index.html"].iter().chain(svgs) {
            let (x, y) =
                (std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap());
            assert!(!x.is_empty(), "{model}: {file} is empty");
            assert!(x == y, "{model}: {file} differs between two runs with the same seed");
        }
        // The report page shows every plot and the summary.
        let index = std::fs::read_to_string(a.join("index.html")).unwrap();
        for svg in svgs {
            assert!(index.contains(&format!("<img src=\"{svg}\"")), "{model}: {svg} not shown");
        }
        assert!(index.contains("<th>seed</th><td>3</td>"), "{index}");
        // The plots are drawn with axes, ticks and a legend.
        let latency = std::fs::read_to_string(a.join("latency.svg")).unwrap();
        for text in ["simulated time (s)", "p99.9", "log scale"] {
            assert!(latency.contains(text), "{model}: latency.svg lacks {text:?}");
        }
        let labels = latency.matches("<text").count();
        assert!(
            labels >= 12,
            "{model}: latency.svg has {labels} labels (title, axes, ticks, legend)"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["seed"], 3);
        assert!(summary["latency_ms_p99"].as_f64().unwrap() > 0.0);
        match model {
            "map" => {
                assert!(summary["writes_acknowledged"].as_u64().unwrap() > 50_000, "{summary}");
                assert_eq!(summary["writes_lost"], 0);
                assert_eq!(summary["failures"].as_array().unwrap().len(), 0, "{summary}");
            }
            _ => {
                assert!(summary["turns_acknowledged"].as_u64().unwrap() > 50_000, "{summary}");
                assert_eq!(summary["turns_lost"], 0);
            }
        }
    }
    // Several seeds: each run's report, and their plots together (median, least to most).
    let out_dir = dir.path().join("seeds");
    let o = Command::new(botclaw_bin())
        .args(["sim", "--scenario", scenario, "--seed", "3", "--seeds", "2", "--model", "ring"])
        .args(["--quiet", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let together = out_dir.join("steady-ring-seeds3-4");
    for file in ["throughput.svg", "latency.svg", "balance.svg"] {
        let svg = std::fs::read_to_string(together.join(file)).unwrap();
        assert!(svg.contains("(2 seeds)") && svg.contains("median"), "{file}");
    }
    let summary = std::fs::read_to_string(together.join("summary.json")).unwrap();
    assert!(summary.contains("\"runs\": 2"), "{summary}");
    assert!(out_dir.join("steady-ring-seed4/summary.json").exists());
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[workload]\nturns_per_sec = 5\n").unwrap();
    let o = Command::new(botclaw_bin()).args(["sim", "--scenario"]).arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("turns_per_sec"), "{err}");
    // A formed start runs by the ring too (the shipped 5000-node scenario is one).
    let formed = dir.path().join("formed.toml");
    std::fs::write(&formed, "name = \"x\"\nstart = \"formed\"\nduration_s = 10\n").unwrap();
    let o = Command::new(botclaw_bin())
        .args(["sim", "--model", "ring", "--quiet", "--scenario"])
        .arg(&formed)
        .arg("--out")
        .arg(dir.path().join("formed-out"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `botclaw sim --set KEY=V1,V2 --seeds 2`: a run per (value, seed), run two at a time,
/// each byte-identical to the same run made alone; a table per value across the seeds; a
/// sweep CSV with a row per run and plots against the swept value.
#[test]
fn sim_sweeps_compare_seeds_and_run_in_parallel_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("small.toml");
    std::fs::write(
        &scenario,
        "name = \"small\"\nnodes = 5\nduration_s = 20\n[workload]\nconversations = 2000\n\
         turns_per_s = 400\n",
    )
    .unwrap();
    let run = |out: &str, jobs: &str| {
        let out_dir = dir.path().join(out);
        let o = Command::new(botclaw_bin())
            .args(["sim", "--scenario"])
            .arg(&scenario)
            .args(["--seed", "3", "--seeds", "2", "--set", "gossip.probe_period_ms=500,1000"])
            .args(["--jobs", jobs, "--quiet", "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        (out_dir, stdout)
    };
    let (two, said) = run("two", "2");
    let (one, _) = run("one", "1");
    // Each run is the same whether it ran alone or beside another.
    for value in ["500", "1000"] {
        for seed in [3, 4] {
            let name = format!("small-map-gossip.probe_period_ms={value}-seed{seed}");
            for file in ["summary.json", "series.csv", "latency.svg"] {
                let a = std::fs::read(two.join(&name).join(file)).unwrap();
                let b = std::fs::read(one.join(&name).join(file)).unwrap();
                assert!(!a.is_empty() && a == b, "{name}/{file} differs with --jobs 2");
            }
        }
    }
    // The seeds compared per value: every metric's median, range and interval.
    assert!(said.contains("across 2 seeds (gossip.probe_period_ms = 500):"), "{said}");
    assert!(said.contains("| metric | median | min | max | mean, 95% interval (2 seeds) |"));
    assert!(said.contains("| latency_ms_p99 |") && said.contains("| writes_lost | 0 | 0 | 0 |"));
    let seeds = one.join("small-map-gossip.probe_period_ms=1000-seeds3-4");
    assert!(std::fs::read_to_string(seeds.join("seeds.md"))
        .unwrap()
        .contains("| writes_acknowledged |"));
    // The sweep: a CSV row per (value, seed), and plots against the value.
    let sweep = one.join("small-map-sweep-gossip.probe_period_ms");
    let csv = std::fs::read_to_string(sweep.join("sweep.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5, "{csv}");
    assert_eq!(rows[0][..2], ["gossip.probe_period_ms", "seed"]);
    let keyed: Vec<(&str, &str)> = rows[1..].iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(keyed, [("500", "3"), ("500", "4"), ("1000", "3"), ("1000", "4")]);
    let acked = rows[0].iter().position(|c| *c == "writes_acknowledged").expect("column");
    assert!(rows[1..].iter().all(|r| r[acked].parse::<f64>().unwrap() > 1000.0), "{csv}");
    assert_eq!(
        csv,
        std::fs::read_to_string(two.join("small-map-sweep-gossip.probe_period_ms/sweep.csv"))
            .unwrap()
    );
    let svg = std::fs::read_to_string(sweep.join("latency_ms_p99.svg")).unwrap();
    assert!(svg.contains("latency_ms_p99 by gossip.probe_period_ms (2 seeds)"), "{svg}");
    assert!(svg.contains("least to most"), "the band is drawn");
    let index = std::fs::read_to_string(sweep.join("index.html")).unwrap();
    assert!(index.contains("<img src=\"latency_ms_p99.svg\""), "{index}");
    // A key the scenario does not have is refused, naming it.
    let o = Command::new(botclaw_bin())
        .args(["sim", "--scenario"])
        .arg(&scenario)
        .args(["--set", "gossip.probe_perod_ms=1,2", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("probe_perod_ms"));
}

/// `bench --direct` against three nodes: each connection sends a conversation's turns to
/// the node that answered the last one, so only first turns are forwarded; `--admin` for
/// every node gives the cluster's CPU seconds per 1000 turns.
#[test]
fn bench_direct_sends_turns_to_owners_and_reports_cpu() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    if by_map() {
        c.wait_placed(&[0, 1, 2], Duration::from_secs(30));
    }
    let mut cmd = Command::new(botclaw_bin());
    cmd.args(["bench", "--json", "--direct", "--connections", "2", "--conversations", "20"])
        .args(["--turns", "2000", "--pipeline", "4", "--connect"])
        .arg(c.nodes[1].ports.client.to_string());
    for n in &c.nodes {
        cmd.args(["--admin", &n.ports.admin.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &report["cluster"];
    assert_eq!(run["turns"], 2000, "{report:#}");
    assert!(run["errors"].as_object().unwrap().is_empty(), "{report:#}");
    // At most the first turn of each conversation on each connection is forwarded.
    let forwarded = run["forwarded_us"]["count"].as_u64().unwrap_or(0);
    assert!(forwarded <= 2 * 20, "{forwarded} forwarded: {report:#}");
    let forwards: f64 =
        c.nodes.iter().map(|n| metric(&n.metrics(), "botclaw_forwards_total")).sum();
    assert!(forwards <= 40.0, "the nodes forwarded {forwards}");
    let cpu = run["cpu_seconds"].as_f64().unwrap();
    let per = run["cpu_s_per_1000_turns"].as_f64().unwrap();
    assert!(cpu > 0.0 && (per - cpu / 2.0).abs() < 1e-9, "{report:#}");
    // The nodes export the same CPU time to Prometheus.
    assert!(metric(&c.nodes[0].metrics(), "botclaw_process_cpu_seconds_total") > 0.0);
}

/// Runs `tests/bench/SCRIPT` with the debug binary and `args`, and returns what it
/// printed (asserting it succeeded); `None` (skipped) by the ring, where the script would
/// only run its default-mode nodes again, or without python3 or one of `tools`.
fn bench_script(script: &str, args: &[&str], tools: &[&str]) -> Option<String> {
    if std::env::var_os("BOTCLAW_TEST_BY_RING").is_some() {
        return None;
    }
    if !["python3"].iter().chain(tools).all(|t| have_tool(t, &["--version"])) {
        return None;
    }
    let _one_map_cluster = map_cluster_exclusive();
    let path = format!("{}/bench/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(path)
        .args(["--bin", &botclaw_bin().display().to_string()])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Some(stdout)
}

/// The cells of a printed Markdown table's rows, but the header (starting `header`).
fn table_rows<'a>(stdout: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with(header))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect()
}

/// `tests/bench/fidelity.py`, the simulator against real processes, runs end to end at a
/// small size: both sides measure the kill's detection and reassignment (within the
/// failure detector's few seconds), a new node's way in (a first shard owned, then its
/// moves done), a latency, and a skewed load rebalanced (both sides' load loops decide
/// moves within the run).
#[test]
fn fidelity_script_prints_simulated_and_real_side_by_side() {
    let args = ["--nodes", "4", "--runs", "1", "--seeds", "2", "--turns", "500", "--skew-s", "20"];
    let Some(stdout) = bench_script("fidelity.py", &args, &[]) else { return };
    let rows = table_rows(&stdout, "| measure");
    assert_eq!(rows.len(), 10, "{stdout}");
    // A cell is the median, then the range when there are several runs (two seeds).
    let median = |cell: &str| cell.split(" (").next().unwrap_or(cell).to_string();
    for row in &rows {
        let range = row[2].strip_suffix(')').and_then(|c| c.split_once(" (")).map(|x| x.1);
        let (least, most) = range.and_then(|r| r.split_once(" to ")).unwrap_or_default();
        assert!(!least.is_empty() && !most.is_empty(), "{row:?} has no range in\n{stdout}");
    }
    let secs = |cell: &str| median(cell).trim_end_matches(" s").parse::<f64>().unwrap_or(f64::NAN);
    for row in &rows[..2] {
        for cell in [row[2], row[3]] {
            assert!((0.3..30.0).contains(&secs(cell)), "{row:?} in\n{stdout}");
        }
    }
    // The join: a first shard owned no later than the moves are done ("never" fails).
    let (owning, settled) = (&rows[2], &rows[3]);
    for col in [2, 3] {
        let (o, s) = (secs(owning[col]), secs(settled[col]));
        assert!(0.0 < o && o <= s && s < 60.0, "{owning:?} {settled:?} in\n{stdout}");
    }
    for row in &rows[4..6] {
        assert!(median(row[2]).ends_with(" ms") && median(row[3]).ends_with(" ms"), "{row:?}");
    }
    // The skew: unbalanced at the start on both sides, moves decided, the last one within
    // the run, and no worse at the end than at the start.
    let times = |cell: &str| median(cell).trim_end_matches('x').parse::<f64>().unwrap_or(f64::NAN);
    let moves =
        |cell: &str| median(cell).trim_end_matches(" moves").parse::<f64>().unwrap_or(f64::NAN);
    for col in [2, 3] {
        let (start, end) = (times(rows[6][col]), times(rows[7][col]));
        assert!(start > 1.1 && end <= start, "{:?} {:?} in\n{stdout}", rows[6], rows[7]);
        assert!(moves(rows[8][col]) >= 1.0, "{:?} in\n{stdout}", rows[8]);
        let last = secs(rows[9][col]);
        assert!(0.0 < last && last <= 20.0, "{:?} in\n{stdout}", rows[9]);
    }
}

/// `tests/bench/side_by_side.py`, the script behind README's performance table, runs end
/// to end at a small size (Redis from Debian's `redis-server`, the debug binary) and prints
/// every row with figures.
#[test]
fn side_by_side_script_prints_the_table() {
    let args = [
        "--turns",
        "1500",
        "--latency-turns",
        "200",
        "--connections",
        "4",
        "--pipeline",
        "4",
        "--conversations",
        "100",
    ];
    let Some(stdout) = bench_script("side_by_side.py", &args, &["redis-server"]) else { return };
    let rows = table_rows(&stdout, "| setup");
    assert_eq!(rows.len(), 8, "{stdout}");
    for cells in rows {
        let tps: f64 = cells[2].replace(',', "").parse().unwrap_or(0.0);
        assert!(tps > 0.0, "{cells:?}");
        assert!(cells[6].parse::<u64>().is_ok_and(|p| p > 0), "p50 of {cells:?}");
    }
}
