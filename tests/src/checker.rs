//! A load of many conversations driven through failover clients, and a checker over what
//! the clients saw acknowledged versus what the cluster's histories hold afterwards.
//!
//! The checker proves, per conversation: every acknowledged turn is in the history with
//! the number it was acknowledged with; no id appears twice; turn numbers run 1, 2, 3, ...
//! without gaps or repeats; and acknowledged turns of one client come in the order sent.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use botclaw_client::protocol::HistoryTurn;
use botclaw_client::{FailoverClient, FailoverOptions};

/// Turns asked for per history: the node's default window (`turns_kept_max`) is 64, so a
/// conversation checked with [`check`] must stay within 64 turns ([`check_window`] for
/// nodes configured with a larger window).
const HISTORY_LIMIT: u32 = 64;

/// One acknowledged turn, as the client saw it.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: String,
    pub turn: u64,
    pub at: Instant,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Acknowledged turns per conversation, in the order sent.
    pub acks: BTreeMap<String, Vec<Ack>>,
    /// Turns that never got an answer (the client gave up): conversation, id, error.
    pub failures: Vec<(String, String, String)>,
}

impl LoadReport {
    /// Adds a later run's acknowledgements.
    pub fn merge(&mut self, later: LoadReport) {
        for (conv, acks) in later.acks {
            self.acks.entry(conv).or_default().extend(acks);
        }
        self.failures.extend(later.failures);
    }

    pub fn acked(&self) -> usize {
        self.acks.values().map(Vec::len).sum()
    }

    /// Longest wait between two acknowledged turns of one conversation, and which.
    pub fn longest_gap(&self) -> (Duration, String) {
        let mut worst = (Duration::ZERO, String::new());
        for (conv, acks) in &self.acks {
            for w in acks.windows(2) {
                let gap = w[1].at - w[0].at;
                if gap > worst.0 {
                    worst = (gap, conv.clone());
                }
            }
        }
        worst
    }
}

/// Runs `convs` conversations (`prefix-0` ...) on `workers` tasks, each worker owning a
/// slice of them and sending their turns in turn (message ids `conv/m<n>` for `n` in
/// `turns`), until `stop` is set or every conversation is done. Worker `w` starts at node
/// `w % seeds.len()`.
pub async fn run_load(
    seeds: Vec<SocketAddr>,
    prefix: &str,
    convs: usize,
    workers: usize,
    turns: std::ops::RangeInclusive<u64>,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    let names = (0..convs).map(|k| format!("{prefix}-{k}")).collect();
    run_load_on(seeds, names, workers, turns, Duration::ZERO, stop).await
}

/// [`run_load`] over the given conversations; each worker starts a turn at most every
/// `pace` (zero: as fast as answers come). A paced load lasts as long on a fast machine as
/// on a slow one, so a test that must act while it runs does not race the machine's speed.
pub async fn run_load_on(
    seeds: Vec<SocketAddr>,
    convs: Vec<String>,
    workers: usize,
    turns: std::ops::RangeInclusive<u64>,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    run_load_counted(seeds, convs, workers, turns, pace, stop, Default::default()).await
}

/// [`run_load_on`], counting acknowledged turns in `acked` as they come.
async fn run_load_counted(
    seeds: Vec<SocketAddr>,
    convs: Vec<String>,
    workers: usize,
    turns: std::ops::RangeInclusive<u64>,
    pace: Duration,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> LoadReport {
    let (first, turns_max) = (*turns.start(), *turns.end());
    let convs = Arc::new(convs);
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut order = seeds.clone();
        order.rotate_left(w % seeds.len());
        let (report, stop, convs, acked) =
            (report.clone(), stop.clone(), convs.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let client = FailoverClient::connect(&order, FailoverOptions::default())
                .await
                .expect("no node reachable at the start of the load");
            let mine: Vec<String> = convs.iter().skip(w).step_by(workers).cloned().collect();
            let mut next: Vec<u64> = vec![first; mine.len()];
            let mut dead: HashSet<usize> = HashSet::new();
            let mut ticks = (!pace.is_zero()).then(|| {
                let mut t = tokio::time::interval(pace);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while !stop.load(Ordering::Relaxed) && dead.len() < mine.len() {
                let mut progressed = false;
                for (i, conv) in mine.iter().enumerate() {
                    if dead.contains(&i) || next[i] > turns_max || stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Some(t) = ticks.as_mut() {
                        t.tick().await;
                    }
                    let id = format!("{conv}/m{}", next[i]);
                    match client.say(conv, &id, &format!("turn {}", next[i]), Some("echo")).await {
                        Ok(reply) => {
                            let ack = Ack { id, turn: reply.turn, at: Instant::now() };
                            report.lock().unwrap().acks.entry(conv.clone()).or_default().push(ack);
                            acked.fetch_add(1, Ordering::Relaxed);
                            next[i] += 1;
                            progressed = true;
                        }
                        Err(e) => {
                            // Outcome unknown: stop this conversation (a later turn would
                            // make the checker's expectations ambiguous).
                            report.lock().unwrap().failures.push((conv.clone(), id, e.to_string()));
                            dead.insert(i);
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load worker panicked");
    }
    Arc::try_unwrap(report).expect("workers done").into_inner().unwrap()
}

/// Fetches every conversation's history (through failover clients) and checks it against
/// the acknowledgements; returns the problems found (empty when all is well).
pub async fn check(seeds: &[SocketAddr], report: &LoadReport) -> Vec<String> {
    check_window(seeds, report, HISTORY_LIMIT).await
}

/// [`check`] of conversations up to `window` turns long (the nodes' `turns_kept_max`).
pub async fn check_window(seeds: &[SocketAddr], report: &LoadReport, window: u32) -> Vec<String> {
    let client = FailoverClient::connect(seeds, FailoverOptions::default())
        .await
        .expect("no node reachable for the check");
    let mut problems = Vec::new();
    for (conv, acks) in &report.acks {
        match client.history(conv, Some(window)).await {
            Ok(history) => problems.extend(check_one(conv, acks, &history)),
            Err(e) => problems.push(format!("{conv}: history failed: {e}")),
        }
    }
    problems
}

/// The checks of one conversation.
pub fn check_one(conv: &str, acks: &[Ack], history: &[HistoryTurn]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen_ids = HashSet::new();
    for (i, t) in history.iter().enumerate() {
        if !seen_ids.insert(t.id.as_str()) {
            problems.push(format!("{conv}: id {} appears twice in history", t.id));
        }
        let expected = history[0].turn + i as u64;
        if t.turn != expected {
            problems.push(format!("{conv}: turn {} where {expected} was expected", t.turn));
        }
    }
    if history.first().is_some_and(|t| t.turn != 1) {
        problems.push(format!("{conv}: history starts at turn {}", history[0].turn));
    }
    for ack in acks {
        match history.iter().find(|t| t.id == ack.id) {
            Some(t) if t.turn == ack.turn => {}
            Some(t) => problems.push(format!(
                "{conv}: {} acknowledged as turn {} but history has it as turn {}",
                ack.id, ack.turn, t.turn
            )),
            None => problems.push(format!(
                "{conv}: acknowledged turn {} ({}) is missing from history",
                ack.turn, ack.id
            )),
        }
    }
    for w in acks.windows(2) {
        if w[1].turn <= w[0].turn {
            problems
                .push(format!("{conv}: turn {} acknowledged after turn {}", w[1].turn, w[0].turn));
        }
    }
    problems
}

// Background load for multi-process tests.

/// The runtime the load and the checks run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A load running in the background (up to 64 turns per conversation) while the test
/// does something to the cluster.
pub struct Background {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<LoadReport>,
}

pub fn start_load(
    rt: &tokio::runtime::Runtime,
    seeds: Vec<SocketAddr>,
    convs: Vec<String>,
) -> Background {
    start_load_with(rt, seeds, convs, 12, 64, Duration::ZERO)
}

/// [`start_load`] with `workers` clients, `turns` turns per conversation at most, each
/// client starting a turn at most every `pace`.
pub fn start_load_with(
    rt: &tokio::runtime::Runtime,
    seeds: Vec<SocketAddr>,
    convs: Vec<String>,
    workers: usize,
    turns: u64,
    pace: Duration,
) -> Background {
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let task = rt.spawn(run_load_counted(
        seeds,
        convs,
        workers,
        1..=turns,
        pace,
        stop.clone(),
        acked.clone(),
    ));
    Background { stop, acked, task }
}

/// Waits `d` on the load's runtime.
pub fn pause(rt: &tokio::runtime::Runtime, d: Duration) {
    rt.block_on(async { tokio::time::sleep(d).await });
}

/// How long [`Background::finish_at_least`] lets a slow (busy) machine take.
const LOAD_WAIT: Duration = Duration::from_secs(120);

impl Background {
    /// Turns acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Lets the load go on until it acknowledged at least `n` turns in all (or
    /// [`LOAD_WAIT`] passed: the caller's assertion then fails), then stops it: a test that
    /// needs some load through a fault waits for it rather than for a fixed time, so a busy
    /// machine makes it slower, not red.
    pub fn finish_at_least(self, rt: &tokio::runtime::Runtime, n: usize) -> LoadReport {
        let deadline = Instant::now() + LOAD_WAIT;
        while self.acked() < n && Instant::now() < deadline && !self.task.is_finished() {
            pause(rt, Duration::from_millis(50));
        }
        self.finish(rt)
    }

    /// Stops the load and returns what it saw, printing the longest wait of a conversation.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let report = rt.block_on(self.task).unwrap();
        let (gap, conv) = report.longest_gap();
        eprintln!(
            "acknowledged {} turns; longest wait of one conversation {gap:?} ({conv})",
            report.acked()
        );
        report
    }
}

pub fn assert_consistent(
    c: &crate::Cluster,
    rt: &tokio::runtime::Runtime,
    seeds: &[SocketAddr],
    report: &LoadReport,
) {
    assert_consistent_window(c, rt, seeds, report, 64)
}

/// [`assert_consistent`] of conversations up to `window` turns long.
pub fn assert_consistent_window(
    c: &crate::Cluster,
    rt: &tokio::runtime::Runtime,
    seeds: &[SocketAddr],
    report: &LoadReport,
    window: u32,
) {
    assert!(report.failures.is_empty(), "turns that never got an answer: {:?}", report.failures);
    let problems = rt.block_on(check_window(seeds, report, window));
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        c.logs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(turn: u64, id: &str) -> HistoryTurn {
        HistoryTurn { turn, id: id.into(), text: String::new(), messages: vec![], user: None }
    }

    fn ack(turn: u64, id: &str) -> Ack {
        Ack { id: id.into(), turn, at: Instant::now() }
    }

    #[test]
    fn the_checker_finds_loss_duplicates_gaps_and_renumbering() {
        let good = [turn(1, "a"), turn(2, "b"), turn(3, "c")];
        assert!(check_one("c", &[ack(1, "a"), ack(3, "c")], &good).is_empty());
        let lost = check_one("c", &[ack(1, "a"), ack(4, "d")], &good);
        assert!(lost[0].contains("missing"), "{lost:?}");
        let dup = check_one("c", &[], &[turn(1, "a"), turn(2, "a")]);
        assert!(dup[0].contains("twice"), "{dup:?}");
        let gap = check_one("c", &[], &[turn(1, "a"), turn(3, "b")]);
        assert!(gap[0].contains("expected"), "{gap:?}");
        let renumbered =
            check_one("c", &[ack(2, "b")], &[turn(1, "a"), turn(2, "x"), turn(3, "b")]);
        assert!(renumbered[0].contains("history has it as turn 3"), "{renumbered:?}");
    }
}
