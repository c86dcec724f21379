//! One expensive answer shared by the requests that wait for it at the same
//! time (single flight), without ever answering from before a request came.
//!
//! `GET /devices/available` scans the bus and `/metrics` renders a series
//! set per device: each is a full pass and a body of a few hundred KB.
//! Run once per request, 64 concurrent clients made 64 scans (each on its
//! own reader threads) and 64 bodies exist at once, and vfiod's RSS went
//! from 30 to 84 MiB. A [`Coalesced`] runs at most one at a time.
//!
//! Freshness: a request is answered only by a run that *started after it
//! arrived*, so it never sees the bus or the counters as they were before
//! its request, exactly as if it had run alone. A request that arrives
//! while a run is under way waits for that run to end, then shares the
//! next one with every request that arrived in the meantime. Nothing is
//! kept for a time: with one client, every request runs on its own.
//!
//! Concurrency: a std mutex holds the run counters (never across an
//! await); a `Notify` wakes the waiters when a run ends. The run itself is
//! a task of its own, so a waiter that goes away (its client hung up)
//! strands nobody, and a run that panics ends as an error for the requests
//! sharing it instead of leaving them waiting.

use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// What a run produces: a body, or what failed (shared by every request
/// of the run, so a message rather than an error value).
pub type Shared = Result<Bytes, String>;

/// See the module documentation.
#[derive(Default)]
pub struct Coalesced {
    state: Mutex<State>,
    run_ended: Notify,
}

#[derive(Default)]
struct State {
    /// Runs started so far; the one under way, if any, is number `started`.
    started: u64,
    running: bool,
    /// The newest run that ended, and its result.
    last: Option<(u64, Shared)>,
}

impl Coalesced {
    /// The result of a run of `run` that started no earlier than this
    /// call: the next run to start, shared with every caller waiting for it.
    /// `run` is called only if this caller is the one that starts it.
    pub async fn get<F, Fut>(self: &Arc<Self>, run: F) -> Shared
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Shared> + Send + 'static,
    {
        let mut run = Some(run);
        let wanted = self.lock().started + 1;
        loop {
            // Registered before the state is looked at, so that a run
            // ending between the look and the wait still wakes this one.
            let ended = self.run_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some((number, result)) = &state.last {
                    if *number >= wanted {
                        return result.clone();
                    }
                }
                if !state.running {
                    // Runs are numbered in order: with none under way and
                    // the last one older than wanted, this is run `wanted`.
                    state.running = true;
                    state.started += 1;
                    let number = state.started;
                    let Some(run) = run.take() else {
                        // This caller's own run ended without a result
                        // (cannot happen: a run always stores one).
                        return Err("the shared run ended without an answer".into());
                    };
                    self.spawn_run(number, run());
                }
            }
            ended.await;
        }
    }

    fn spawn_run(
        self: &Arc<Self>,
        number: u64,
        work: impl Future<Output = Shared> + Send + 'static,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            // In a task of its own, so that a panic is a JoinError here.
            let result = match tokio::spawn(work).await {
                Ok(result) => result,
                Err(e) => Err(format!("the shared run failed: {e}")),
            };
            {
                let mut state = this.lock();
                state.last = Some((number, result));
                state.running = false;
            }
            this.run_ended.notify_waiters();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// A run that takes a while and says which run it was.
    fn counting_run(
        runs: &Arc<AtomicU64>,
        gate: &Arc<tokio::sync::Semaphore>,
    ) -> impl Future<Output = Shared> + Send + 'static {
        let runs = runs.clone();
        let gate = gate.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let _open = gate.acquire().await.unwrap();
            Ok(Bytes::from(format!("run {n}")))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_run_and_later_ones_the_next() {
        let shared = Arc::new(Coalesced::default());
        let runs = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        // First wave: one starts run 1, which is held at the gate.
        let first = {
            let (shared, runs, gate) = (shared.clone(), runs.clone(), gate.clone());
            tokio::spawn(async move { shared.get(|| counting_run(&runs, &gate)).await })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Arrived while run 1 is under way: they must not get run 1 (it
        // may have read the state before they came), and share run 2.
        // Each counts itself in the same poll in which `get` notes the run
        // it wants (nothing between them yields), so once all 50 are
        // counted, all 50 arrived while run 1 was under way, however
        // loaded the machine.
        let arrived = Arc::new(AtomicU64::new(0));
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let (shared, runs, gate) = (shared.clone(), runs.clone(), gate.clone());
                let arrived = arrived.clone();
                tokio::spawn(async move {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    shared.get(|| counting_run(&runs, &gate)).await
                })
            })
            .collect();
        while arrived.load(Ordering::SeqCst) < 50 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run at a time");
        gate.add_permits(1000);
        // The first caller may be woken only after run 2 ended too: it then
        // gets run 2, as fresh for it as run 1 (both started after it came).
        let first = first.await.unwrap().unwrap();
        assert!(first == "run 1" || first == "run 2", "{first:?}");
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), "run 2");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // Alone, a caller gets a run of its own.
        let alone = shared.get(|| counting_run(&runs, &gate)).await.unwrap();
        assert_eq!(alone, "run 3");
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_strands_nobody() {
        let shared = Arc::new(Coalesced::default());
        let runs = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let starter = {
            let (shared, runs, gate) = (shared.clone(), runs.clone(), gate.clone());
            tokio::spawn(async move { shared.get(|| counting_run(&runs, &gate)).await })
        };
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        starter.abort();
        let _ = starter.await;
        gate.add_permits(10);
        let next = shared.get(|| counting_run(&runs, &gate)).await.unwrap();
        assert_eq!(next, "run 2");
    }

    #[tokio::test]
    async fn a_run_that_panics_is_an_error_and_the_next_caller_runs_again() {
        let shared = Arc::new(Coalesced::default());
        let failed = shared
            .get(|| async { panic!("scan exploded") })
            .await
            .unwrap_err();
        assert!(failed.contains("shared run failed"), "{failed}");
        let ok = shared.get(|| async { Ok(Bytes::from("fine")) }).await;
        assert_eq!(ok.unwrap(), "fine");
    }
}
