//! Decisions about calls to external services (bot and module services): which instance
//! takes a call ([`Pool`]), each instance's circuit breaker ([`Breaker`], outlier
//! ejection by failures in a row), its health by active checks, and how many retries a
//! service may get ([`RetryBudget`]). Pure: time comes in as milliseconds from the caller's
//! clock, randomness as numbers the caller drew.

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

/// The instances of one service as the caller sees them: calls outstanding, breaker and
/// health of each. The caller holds it under one lock, asks [`Pool::choose`] before a call
/// and reports the outcome with [`Pool::settle`], and the results of active health checks
/// with [`Pool::checked`].
#[derive(Debug, Clone)]
pub struct Pool {
    instances: Vec<InstanceState>,
    instance_max: usize,
    health_failures_max: u32,
}

#[derive(Debug, Clone)]
struct InstanceState {
    outstanding: usize,
    breaker: Breaker,
    /// By active health checks: down after `health_failures_max` failed checks in a row,
    /// up again after one that passes.
    up: bool,
    checks_failed: u32,
}

impl Pool {
    /// `instances` instances, each taking at most `instance_max` calls at once.
    pub fn new(
        instances: usize,
        instance_max: usize,
        breaker_failures: u32,
        breaker_open_ms: u64,
        health_failures_max: u32,
    ) -> Pool {
        let state = InstanceState {
            outstanding: 0,
            breaker: Breaker::new(breaker_failures, breaker_open_ms),
            up: true,
            checks_failed: 0,
        };
        Pool {
            instances: vec![state; instances],
            instance_max,
            health_failures_max: health_failures_max.max(1),
        }
    }

    pub fn outstanding(&self, ix: usize) -> usize {
        self.instances[ix].outstanding
    }

    pub fn breaker(&self, ix: usize) -> BreakerState {
        self.instances[ix].breaker.state()
    }

    /// The instance to call now, by [`pick`] over the instances that may take it (room
    /// under `instance_max`, breaker allowing, up by health checks, not `avoid` unless it
    /// is the only instance), marked with one more call outstanding; a breaker whose open
    /// time is up gives this call its trial. When health checks hold every instance down,
    /// they are ignored (a check that fails everywhere must not stop a service that
    /// answers calls). `None`: no instance takes a call now.
    pub fn choose(
        &mut self,
        now_ms: u64,
        avoid: Option<usize>,
        a: usize,
        b: usize,
    ) -> Option<usize> {
        let any_up = self.instances.iter().any(|i| i.up);
        let alone = self.instances.len() == 1;
        let usable: Vec<bool> = self
            .instances
            .iter()
            .enumerate()
            .map(|(ix, i)| {
                i.outstanding < self.instance_max
                    && (avoid != Some(ix) || alone)
                    && (i.up || !any_up)
                    && i.breaker.would_allow(now_ms)
            })
            .collect();
        let outstanding: Vec<usize> = self.instances.iter().map(|i| i.outstanding).collect();
        let ix = pick(&outstanding, &usable, a, b)?;
        let instance = &mut self.instances[ix];
        let allowed = instance.breaker.allow(now_ms);
        debug_assert!(allowed, "would_allow and allow agree under one lock");
        instance.outstanding += 1;
        Some(ix)
    }

    /// The outcome of a call [`Pool::choose`] gave `ix`; true if a failure opened the
    /// instance's breaker (it is ejected until its open time is up).
    pub fn settle(&mut self, ix: usize, ok: bool, now_ms: u64) -> bool {
        let instance = &mut self.instances[ix];
        instance.outstanding = instance.outstanding.saturating_sub(1);
        if ok {
            instance.breaker.success();
            false
        } else {
            instance.breaker.failure(now_ms)
        }
    }

    /// The result of an active health check of `ix`; `Some(up)` when it changed the
    /// instance's health.
    pub fn checked(&mut self, ix: usize, ok: bool) -> Option<bool> {
        let instance = &mut self.instances[ix];
        let was = instance.up;
        if ok {
            instance.checks_failed = 0;
            instance.up = true;
        } else {
            instance.checks_failed = instance.checks_failed.saturating_add(1);
            if instance.checks_failed >= self.health_failures_max {
                instance.up = false;
            }
        }
        (instance.up != was).then_some(instance.up)
    }

    /// Instances down by health checks.
    pub fn down(&self) -> usize {
        self.instances.iter().filter(|i| !i.up).count()
    }
}

/// How many retries a service may get, as a share of its calls (as Finagle's and
/// Envoy's retry budgets): each call deposits `percent` hundredths of a retry, each retry
/// withdraws one, and `min_per_s` retries a second are allowed however few calls there
/// are. Under an outage retries stay a fraction of the load instead of multiplying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudget {
    percent: u32,
    min_per_s: u32,
    /// In thousandths of a retry.
    balance: u64,
    refilled_ms: u64,
}

/// Retries a budget holds at most (in thousandths), so a long quiet spell does not save
/// up a storm.
const RETRY_BALANCE_MAX: u64 = 100 * 1000;

impl RetryBudget {
    pub fn new(percent: u32, min_per_s: u32) -> RetryBudget {
        RetryBudget { percent, min_per_s, balance: 0, refilled_ms: 0 }
    }

    /// A call was made (not a retry).
    pub fn called(&mut self) {
        self.balance = (self.balance + u64::from(self.percent) * 10).min(RETRY_BALANCE_MAX);
    }

    /// Whether a retry may go now; taken from the budget if so.
    pub fn retry(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.refilled_ms);
        self.refilled_ms = self.refilled_ms.max(now_ms);
        // `min_per_s` a second is `min_per_s` thousandths a millisecond.
        self.balance = (self.balance + elapsed * u64::from(self.min_per_s)).min(RETRY_BALANCE_MAX);
        if self.balance >= 1000 {
            self.balance -= 1000;
            true
        } else {
            false
        }
    }
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

    #[test]
    fn the_pool_skips_full_ejected_and_down_instances_and_gives_the_trial_once() {
        let mut p = Pool::new(3, 2, 2, 1000, 2);
        // Instance 0 fails twice: ejected for a second.
        for _ in 0..2 {
            let ix = loop {
                let ix = p.choose(0, None, 0, 0).unwrap();
                if ix == 0 {
                    break ix;
                }
                p.settle(ix, true, 0);
            };
            p.settle(ix, false, 10);
        }
        assert!(matches!(p.breaker(0), BreakerState::Open { .. }));
        for a in 0..20 {
            let ix = p.choose(20, None, a, a + 1).unwrap();
            assert_ne!(ix, 0, "an ejected instance takes no call");
            p.settle(ix, true, 20);
        }
        // Health checks take 1 down (after two failures), not after one.
        assert_eq!(p.checked(1, false), None);
        assert_eq!(p.checked(1, false), Some(false));
        for a in 0..20 {
            assert_eq!(p.choose(30, None, a, a + 3), Some(2));
            p.settle(2, true, 30);
        }
        // Instance 2 full (2 outstanding): nothing takes a call.
        assert_eq!(p.choose(30, None, 0, 1), Some(2));
        assert_eq!(p.choose(30, None, 0, 1), Some(2));
        assert_eq!(p.choose(30, None, 0, 1), None);
        p.settle(2, true, 30);
        p.settle(2, true, 30);
        // Open time up: one caller gets instance 0's trial.
        let mut trials = 0;
        p.checked(2, false);
        p.checked(2, false);
        for a in 0..10 {
            // 1 and 2 are down, but 0 is up: only 0 is a candidate, and only once.
            if p.choose(1010, None, a, a) == Some(0) {
                trials += 1;
            }
        }
        assert_eq!(trials, 1, "one trial while half open");
        assert_eq!(p.checked(1, true), Some(true), "one passing check brings it back");
        p.settle(0, true, 1020);
        assert_eq!(p.breaker(0), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn health_checks_failing_everywhere_are_ignored() {
        let mut p = Pool::new(2, 8, 5, 1000, 1);
        p.checked(0, false);
        p.checked(1, false);
        assert_eq!(p.down(), 2);
        assert!(p.choose(0, None, 0, 1).is_some());
        // Avoiding the only other instance leaves the one not avoided.
        let mut q = Pool::new(2, 8, 5, 1000, 1);
        assert_eq!(q.choose(0, Some(0), 0, 0), Some(1));
        let mut alone = Pool::new(1, 8, 5, 1000, 1);
        assert_eq!(alone.choose(0, Some(0), 0, 0), Some(0), "a lone instance is retried");
    }

    #[test]
    fn the_retry_budget_is_a_share_of_calls_plus_a_floor() {
        let mut b = RetryBudget::new(20, 0);
        assert!(!b.retry(0), "no calls, no floor: no retry");
        for _ in 0..10 {
            b.called();
        }
        assert!(b.retry(0) && b.retry(0), "20% of 10 calls: two retries");
        assert!(!b.retry(0));
        let mut floor = RetryBudget::new(0, 10);
        assert!(!floor.retry(0));
        assert!(floor.retry(100), "10 a second: one after 100 ms");
        assert!(!floor.retry(150));
        // A long quiet spell saves up at most the cap.
        let mut quiet = RetryBudget::new(0, 10);
        let granted = (0..1000).filter(|_| quiet.retry(100_000_000)).count();
        assert_eq!(granted as u64, RETRY_BALANCE_MAX / 1000);
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

        /// Whatever the calls, outcomes and checks, no instance holds more than its limit,
        /// the outstanding counts are the calls not yet settled, and an instance whose
        /// breaker is open is never chosen.
        #[test]
        fn the_pool_keeps_its_bounds(
            ops in proptest::collection::vec((0u8..4, any::<usize>(), any::<bool>()), 1..300),
        ) {
            let mut p = Pool::new(3, 4, 2, 50, 2);
            let mut out: Vec<usize> = Vec::new();
            let mut now = 0;
            for (op, n, ok) in ops {
                now += n as u64 % 20;
                match op {
                    0 | 1 => {
                        let before: Vec<BreakerState> = (0..3).map(|i| p.breaker(i)).collect();
                        if let Some(ix) = p.choose(now, None, n, n / 3) {
                            let open = matches!(before[ix], BreakerState::Open { until_ms } if now < until_ms);
                            prop_assert!(!open && before[ix] != BreakerState::HalfOpen);
                            out.push(ix);
                        }
                    }
                    2 if !out.is_empty() => {
                        let ix = out.swap_remove(n % out.len());
                        p.settle(ix, ok, now);
                    }
                    _ => {
                        p.checked(n % 3, ok);
                    }
                }
                for ix in 0..3 {
                    let held = out.iter().filter(|&&i| i == ix).count();
                    prop_assert_eq!(p.outstanding(ix), held);
                    prop_assert!(held <= 4);
                }
            }
        }
    }
}
