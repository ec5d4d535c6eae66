//! Decisions about calls to external services (bot and module services): which instance
//! takes a call, and each instance's circuit breaker. Pure: time comes in as milliseconds
//! from the caller's clock, randomness as numbers the caller drew.

/// A circuit breaker: `failures_max` failures in a row open it for `open_ms`; then one
/// trial call is let through (half open): its success closes the breaker, its failure
/// opens it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    failures_max: u32,
    open_ms: u64,
    state: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// No calls until `until_ms`.
    Open { until_ms: u64 },
    /// One trial call is out; others wait for its outcome (refused meanwhile).
    HalfOpen,
}

impl Breaker {
    pub fn new(failures_max: u32, open_ms: u64) -> Breaker {
        Breaker {
            failures_max: failures_max.max(1),
            open_ms,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may start now; a call let through an open breaker whose time is up
    /// is the trial (the breaker is half open until its outcome).
    pub fn allow(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    /// Whether a call could start now, without taking the trial.
    pub fn would_allow(&self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until_ms } => now_ms >= until_ms,
            BreakerState::HalfOpen => false,
        }
    }

    pub fn success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// A failed call; true if this opened the breaker.
    pub fn failure(&mut self, now_ms: u64) -> bool {
        let open = match self.state {
            BreakerState::Closed { failures } => failures + 1 >= self.failures_max,
            BreakerState::HalfOpen => true,
            BreakerState::Open { .. } => false,
        };
        self.state = match self.state {
            _ if open => BreakerState::Open { until_ms: now_ms + self.open_ms },
            BreakerState::Closed { failures } => BreakerState::Closed { failures: failures + 1 },
            other => other,
        };
        open
    }
}

/// The instance to call by power of two choices: of two instances drawn (`a`, `b`, any
/// numbers: taken modulo the candidates), the one with fewer calls outstanding. Candidates
/// are the instances `usable` says may take a call (breaker closed, room under their own
/// limit); `None` if there is none.
pub fn pick(outstanding: &[usize], usable: &[bool], a: usize, b: usize) -> Option<usize> {
    let candidates: Vec<usize> = (0..outstanding.len()).filter(|&i| usable[i]).collect();
    if candidates.is_empty() {
        return None;
    }
    let x = candidates[a % candidates.len()];
    let y = candidates[b % candidates.len()];
    Some(if outstanding[y] < outstanding[x] { y } else { x })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn failures_in_a_row_open_the_breaker_and_a_trial_closes_it() {
        let mut b = Breaker::new(3, 1000);
        assert!(!b.failure(0) && !b.failure(1));
        b.success();
        assert!(!b.failure(2) && !b.failure(3), "a success resets the count");
        assert!(b.failure(4), "the third in a row opens it");
        assert!(!b.allow(500) && !b.allow(1003));
        assert!(b.allow(1004), "the trial");
        assert!(!b.allow(1005), "one trial at a time");
        assert!(b.failure(1100), "a failed trial opens it again");
        assert!(!b.allow(2099) && b.allow(2100));
        b.success();
        assert!(b.allow(2101) && b.allow(2102), "closed again");
    }

    #[test]
    fn pick_takes_the_less_loaded_of_two_and_skips_unusable_instances() {
        assert_eq!(pick(&[5, 1, 3], &[true; 3], 0, 1), Some(1));
        assert_eq!(pick(&[5, 1, 3], &[true; 3], 0, 2), Some(2));
        assert_eq!(pick(&[5, 1, 3], &[true, false, true], 1, 2), Some(2));
        assert_eq!(pick(&[0, 0], &[false, false], 0, 1), None);
    }

    proptest! {
        /// The pick is usable, and never busier than both draws.
        #[test]
        fn pick_is_usable_and_no_busier_than_the_draws(
            load in proptest::collection::vec((0usize..50, any::<bool>()), 1..8),
            a in any::<usize>(),
            b in any::<usize>(),
        ) {
            let outstanding: Vec<usize> = load.iter().map(|l| l.0).collect();
            let usable: Vec<bool> = load.iter().map(|l| l.1).collect();
            match pick(&outstanding, &usable, a, b) {
                None => prop_assert!(usable.iter().all(|u| !u)),
                Some(i) => {
                    prop_assert!(usable[i]);
                    let c: Vec<usize> = (0..usable.len()).filter(|&i| usable[i]).collect();
                    let (x, y) = (c[a % c.len()], c[b % c.len()]);
                    prop_assert!(outstanding[i] <= outstanding[x].max(outstanding[y]));
                    prop_assert!(i == x || i == y);
                }
            }
        }
    }
}
