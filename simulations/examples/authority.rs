//! Timings of the authoritative placement protocol on simulated time, over seeds: a crashed
//! owner's shards served again, a killed controller leader replaced, a joining node's moves
//! settled. `cargo run --release -p botclaw-sim --example authority [seeds]`.

use botclaw_sim::authority::{Authority, AuthorityConfig};

/// Steps of 10 ms until `done` holds (at most `limit_ms`); the time it took.
fn until(a: &mut Authority, limit_ms: u64, done: impl Fn(&Authority) -> bool) -> Option<u64> {
    let start = a.now_ms();
    while a.now_ms() - start < limit_ms {
        if done(a) {
            return Some(a.now_ms() - start);
        }
        let next = a.now_ms() + 10;
        a.run_until(next);
    }
    None
}

fn summary(name: &str, mut ms: Vec<u64>) {
    ms.sort_unstable();
    let median = ms[ms.len() / 2];
    let max = ms[ms.len() - 1];
    println!("{name}: median {median} ms, max {max} ms over {} runs", ms.len());
}

fn main() {
    let seeds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let (mut crash, mut leader, mut join) = (Vec::new(), Vec::new(), Vec::new());
    for seed in 0..seeds {
        let mut a = Authority::new(AuthorityConfig::default(), seed);
        a.run_until(8_000);
        // A non-voter that owns shards is killed.
        let victim = 4;
        a.crash(victim);
        let name = format!("n{victim}");
        crash.push(
            until(&mut a, 30_000, |a| {
                a.map().owned_counts().get(name.as_str()).is_none_or(|&n| n == 0)
            })
            .expect("shards reassigned"),
        );
        a.start(victim);
        a.run_until(a.now_ms() + 10_000);
        let l = a.leader().expect("a leader");
        a.crash(l);
        leader.push(until(&mut a, 30_000, |a| a.leader().is_some()).expect("a new leader"));
        a.start(l);
        a.run_until(a.now_ms() + 10_000);
        let x = a.join();
        let name = format!("n{x}");
        join.push(
            until(&mut a, 60_000, |a| {
                a.map().owned_counts().get(name.as_str()).is_some_and(|&n| n > 0)
                    && a.map().shards().all(|e| e.learners.is_empty())
            })
            .unwrap_or_else(|| {
                let learning: Vec<_> = a
                    .map()
                    .shards()
                    .enumerate()
                    .filter(|(_, e)| !e.learners.is_empty())
                    .map(|(s, e)| (s, *e))
                    .collect();
                panic!(
                    "seed {seed}: moves not settled: {:?}; learning {learning:?}",
                    a.map().owned_counts()
                )
            }),
        );
        let r = a.report();
        assert!(r.problems.is_empty(), "seed {seed}: {:?}", r.problems);
    }
    summary("crash -> the victim's shards owned by survivors", crash);
    summary("controller leader killed -> a new leader", leader);
    summary("node joins -> its moves settled", join);
}
