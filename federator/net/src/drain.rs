//! One drain for every server of a process, and the health and readiness of its tasks.
//!
//! A process makes one [`Tasks`] and starts everything through it:
//! - [`Tasks::spawn_server`] for a server: it is handed the drain [`Signal`] and stops by itself
//!   when the signal fires (stops accepting, ends its long-lived streams, finishes what is in
//!   flight);
//! - [`Tasks::spawn`] for a background loop (a watcher, a renewal, a ticker): it is dropped at
//!   the drain, at its next await point;
//! - [`Tasks::spawn_admin`] for the admin server: it keeps answering (`/readyz` then says
//!   "draining") until everything else has finished or the deadline passed, then stops.
//!
//! `/healthz` is [`Tasks::health`]: a task that ended before the drain (it returned or
//! panicked) makes the process unhealthy, naming the task and why, so a supervisor restarts
//! it. `/readyz` is [`Tasks::readiness`]: every [`Ready`] condition a component registered
//! (the first xDS generation built, the model loaded, routes received) must hold, and the
//! process must not be draining.
//!
//! [`Tasks::drain`] fires the signal and waits for the servers and loops up to a deadline;
//! what is still running then is aborted and named in the [`DrainReport`].

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The drain signal a server watches.
#[derive(Debug, Clone)]
pub struct Signal(CancellationToken);

impl Signal {
    /// Resolves when the drain starts.
    pub async fn drained(&self) {
        self.0.cancelled().await
    }

    /// Resolves when the drain starts (owning the signal, for `serve_with_shutdown`-style APIs).
    pub fn drained_owned(self) -> impl Future<Output = ()> + Send + 'static {
        self.0.cancelled_owned()
    }

    pub fn is_draining(&self) -> bool {
        self.0.is_cancelled()
    }

    /// A signal that never fires (servers run outside a process's drain, e.g. in tests).
    pub fn never() -> Signal {
        Signal(CancellationToken::new())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Finished,
    /// Ended before the drain: returned, or panicked with this message.
    Failed(String),
}

#[derive(Debug)]
struct Task {
    name: String,
    state: State,
    abort: Option<AbortHandle>,
    admin: bool,
}

/// A readiness condition computed when asked (from a component's own state).
pub type CheckFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct Registry {
    tasks: BTreeMap<u64, Task>,
    ready: BTreeMap<u64, (String, Result<(), String>)>,
    checks: Vec<(String, CheckFn)>,
    /// Work started with [`Tasks::track`] that has not ended.
    tracked: BTreeMap<u64, AbortHandle>,
    next: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("tasks", &self.tasks)
            .field("ready", &self.ready)
            .field("checks", &self.checks.len())
            .finish()
    }
}

#[derive(Debug)]
struct Shared {
    drain: CancellationToken,
    admin_stop: CancellationToken,
    work: TaskTracker,
    admin: TaskTracker,
    reg: Mutex<Registry>,
}

/// The tasks of one process, its drain and its health (cheap to clone).
#[derive(Debug, Clone)]
pub struct Tasks(Arc<Shared>);

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    pub took: Duration,
    /// Tasks still running at the deadline (aborted).
    pub aborted: Vec<String>,
}

impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.aborted.is_empty() {
            write!(f, "drained in {} ms", self.took.as_millis())
        } else {
            write!(
                f,
                "drain deadline reached after {} ms; aborted: {}",
                self.took.as_millis(),
                self.aborted.join(", ")
            )
        }
    }
}

/// A readiness condition (starts not ready). Dropping it does not change it.
#[derive(Debug, Clone)]
pub struct Ready {
    id: u64,
    tasks: Tasks,
}

impl Ready {
    pub fn set_ready(&self) {
        self.set(Ok(()));
    }

    pub fn set_not_ready(&self, why: impl Into<String>) {
        self.set(Err(why.into()));
    }

    fn set(&self, v: Result<(), String>) {
        if let Some(r) = self.tasks.reg().ready.get_mut(&self.id) {
            r.1 = v;
        }
    }
}

impl Tasks {
    pub fn new() -> Self {
        Tasks(Arc::new(Shared {
            drain: CancellationToken::new(),
            admin_stop: CancellationToken::new(),
            work: TaskTracker::new(),
            admin: TaskTracker::new(),
            reg: Mutex::new(Registry::default()),
        }))
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        self.0.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn signal(&self) -> Signal {
        Signal(self.0.drain.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.0.drain.is_cancelled()
    }

    /// A server: `f` gets the drain signal and must stop by itself once it fires.
    pub fn spawn_server<F, Fut>(&self, name: &str, f: F)
    where
        F: FnOnce(Signal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = f(self.signal());
        self.start(name, fut, false);
    }

    /// A background loop: dropped when the drain starts.
    pub fn spawn<Fut>(&self, name: &str, fut: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let drain = self.0.drain.clone();
        self.start(
            name,
            async move {
                tokio::select! {
                    _ = fut => {}
                    _ = drain.cancelled() => {}
                }
            },
            false,
        );
    }

    /// Work the drain waits for but that is not a task of its own (one stream's session, a
    /// request): not in the health list, ends by itself.
    pub fn track<Fut>(&self, fut: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let id = {
            let mut r = self.reg();
            r.next += 1;
            r.next
        };
        let me = self.clone();
        let h = self.0.work.spawn(async move {
            fut.await;
            me.reg().tracked.remove(&id);
        });
        let mut r = self.reg();
        if !h.is_finished() {
            r.tracked.insert(id, h.abort_handle());
        }
    }

    /// The admin server: `f` gets a signal that fires once the rest has drained.
    pub fn spawn_admin<F, Fut>(&self, name: &str, f: F)
    where
        F: FnOnce(Signal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = f(Signal(self.0.admin_stop.clone()));
        self.start(name, fut, true);
    }

    fn start<Fut>(&self, name: &str, fut: Fut, admin: bool)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let id = {
            let mut r = self.reg();
            r.next += 1;
            let id = r.next;
            r.tasks.insert(
                id,
                Task {
                    name: name.to_string(),
                    state: State::Running,
                    abort: None,
                    admin,
                },
            );
            id
        };
        let me = self.clone();
        let wrapped = async move {
            let outcome = AssertUnwindSafe(fut).catch_unwind().await;
            let draining = me.is_draining();
            let mut r = me.reg();
            if let Some(t) = r.tasks.get_mut(&id) {
                t.state = match outcome {
                    Ok(()) if draining => State::Finished,
                    Ok(()) => State::Failed("exited".into()),
                    Err(p) => {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        tracing::error!(task = %t.name, panic = %msg, "task panicked");
                        State::Failed(format!("panicked: {msg}"))
                    }
                };
                if !draining {
                    if let State::Failed(why) = &t.state {
                        tracing::error!(task = %t.name, why, "task ended before the drain");
                    }
                }
            }
        };
        let tracker = if admin { &self.0.admin } else { &self.0.work };
        let handle = tracker.spawn(wrapped);
        if let Some(t) = self.reg().tasks.get_mut(&id) {
            if t.state == State::Running {
                t.abort = Some(handle.abort_handle());
            }
        }
    }

    /// A readiness condition named `name`, not ready until [`Ready::set_ready`].
    pub fn readiness(&self, name: &str) -> Ready {
        let mut r = self.reg();
        r.next += 1;
        let id = r.next;
        r.ready
            .insert(id, (name.to_string(), Err("starting".to_string())));
        Ready {
            id,
            tasks: self.clone(),
        }
    }

    /// A readiness condition computed from a component's state each time readiness is asked.
    pub fn readiness_check(&self, name: &str, check: CheckFn) {
        self.reg().checks.push((name.to_string(), check));
    }

    /// `Ok` while every task runs (or the process is draining); `Err` names each task that
    /// ended early and how.
    pub fn health(&self) -> Result<(), String> {
        let r = self.reg();
        let failed: Vec<String> = r
            .tasks
            .values()
            .filter_map(|t| match &t.state {
                State::Failed(why) => Some(format!("task {:?} {why}", t.name)),
                _ => None,
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// `Ok` when healthy, not draining and every readiness condition holds; `Err` says which
    /// do not.
    pub fn readiness_report(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        self.health()?;
        let (mut waiting, checks): (Vec<String>, Vec<(String, CheckFn)>) = {
            let r = self.reg();
            (
                r.ready
                    .values()
                    .filter_map(|(n, s)| s.as_ref().err().map(|e| format!("{n}: {e}")))
                    .collect(),
                r.checks.clone(),
            )
        };
        for (n, c) in checks {
            if let Err(e) = c() {
                waiting.push(format!("{n}: {e}"));
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join("; "))
        }
    }

    /// Fires the drain signal, waits for servers and loops until `deadline` (aborting what is
    /// left), then stops the admin server.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let start = Instant::now();
        self.0.drain.cancel();
        self.0.work.close();
        let mut aborted = Vec::new();
        if tokio::time::timeout(deadline, self.0.work.wait())
            .await
            .is_err()
        {
            {
                let mut r = self.reg();
                for t in r.tasks.values() {
                    if !t.admin && t.state == State::Running {
                        if let Some(a) = &t.abort {
                            a.abort();
                        }
                        aborted.push(t.name.clone());
                    }
                }
                let streams = std::mem::take(&mut r.tracked);
                if !streams.is_empty() {
                    aborted.push(format!("open streams/requests: {}", streams.len()));
                }
                for a in streams.values() {
                    a.abort();
                }
            }
            self.0.work.wait().await;
        }
        self.0.admin_stop.cancel();
        self.0.admin.close();
        let left = deadline.saturating_sub(start.elapsed()) + Duration::from_millis(500);
        if tokio::time::timeout(left, self.0.admin.wait())
            .await
            .is_err()
        {
            let r = self.reg();
            for t in r.tasks.values().filter(|t| t.admin) {
                if t.state == State::Running {
                    if let Some(a) = &t.abort {
                        a.abort();
                    }
                    aborted.push(t.name.clone());
                }
            }
        }
        aborted.sort();
        DrainReport {
            took: start.elapsed(),
            aborted,
        }
    }

    /// Aborts everything at once (tests, and a second signal during a drain).
    pub fn abort_all(&self) {
        self.0.drain.cancel();
        self.0.admin_stop.cancel();
        for t in self.reg().tasks.values() {
            if let Some(a) = &t.abort {
                a.abort();
            }
        }
    }

    /// The names of the tasks still running (for status pages and tests).
    pub fn running(&self) -> Vec<String> {
        self.reg()
            .tasks
            .values()
            .filter(|t| t.state == State::Running)
            .map(|t| t.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_makes_the_process_unhealthy_by_name() {
        let t = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.spawn("watcher", async move {
            let _ = rx.await;
        });
        t.spawn_server("boom", |_s| async move {
            panic!("bound port vanished");
        });
        // Wait for the panic to be recorded.
        for _ in 0..1000 {
            if t.health().is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let e = t.health().unwrap_err();
        assert!(
            e.contains("task \"boom\" panicked: bound port vanished"),
            "{e}"
        );
        assert!(!e.contains("watcher"), "{e}");
        drop(tx);
        for _ in 0..1000 {
            if t.health().unwrap_err().contains("watcher") {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(t.health().unwrap_err().contains("task \"watcher\" exited"));
    }

    #[tokio::test]
    async fn readiness_needs_every_condition_and_goes_away_at_the_drain() {
        let t = Tasks::new();
        let a = t.readiness("xds");
        let b = t.readiness("model");
        assert_eq!(
            t.readiness_report().unwrap_err(),
            "xds: starting; model: starting"
        );
        a.set_ready();
        b.set_not_ready("registry file missing");
        assert_eq!(
            t.readiness_report().unwrap_err(),
            "model: registry file missing"
        );
        b.set_ready();
        assert_eq!(t.readiness_report(), Ok(()));
        let routes = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = routes.clone();
        t.readiness_check(
            "routes",
            Arc::new(move || {
                if r.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("none yet".into())
                }
            }),
        );
        assert_eq!(t.readiness_report().unwrap_err(), "routes: none yet");
        routes.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.readiness_report(), Ok(()));
        let r = t.drain(Duration::from_secs(1)).await;
        assert!(r.aborted.is_empty());
        assert_eq!(t.readiness_report().unwrap_err(), "draining");
    }

    #[tokio::test]
    async fn drain_stops_servers_and_loops_then_the_admin_server() {
        let t = Tasks::new();
        let order = Arc::new(Mutex::new(Vec::<&str>::new()));
        let o = order.clone();
        t.spawn_server("server", |s| async move {
            s.drained().await;
            o.lock().unwrap().push("server");
        });
        let o = order.clone();
        t.spawn_admin("admin", |s| async move {
            s.drained().await;
            o.lock().unwrap().push("admin");
        });
        t.spawn("loop", std::future::pending());
        let r = t.drain(Duration::from_secs(5)).await;
        assert!(r.aborted.is_empty(), "{r}");
        assert_eq!(*order.lock().unwrap(), vec!["server", "admin"]);
        assert!(t.running().is_empty());
        // Ending at the drain is not a failure.
        assert_eq!(t.health(), Ok(()));
    }

    #[tokio::test]
    async fn the_deadline_aborts_a_server_that_does_not_stop_and_names_it() {
        let t = Tasks::new();
        t.spawn_server("stuck stream", |_s| std::future::pending());
        t.spawn_server("polite", |s| async move { s.drained().await });
        t.track(std::future::pending());
        t.track(async {});
        let r = t.drain(Duration::from_millis(50)).await;
        assert_eq!(
            r.aborted,
            vec![
                "open streams/requests: 1".to_string(),
                "stuck stream".to_string()
            ]
        );
        assert!(
            r.to_string()
                .contains("aborted: open streams/requests: 1, stuck stream"),
            "{r}"
        );
    }
}
