//! Leader election among the agent's replicas with a `coordination.k8s.io/v1` Lease, by the
//! algorithm of client-go's `leaderelection` package:
//!
//! - A candidate reads the Lease. It takes it when it has no holder, or when the record it saw
//!   has not changed for `leaseDurationSeconds` **by its own clock** (the time it observed the
//!   record, not the `renewTime` written in it: clocks of different nodes never meet).
//! - Taking and renewing are `replace`s carrying the `resourceVersion` read: of two candidates
//!   only one write succeeds, the other gets `409 Conflict` and stays a follower.
//! - The holder renews every retry period. When it has not renewed for the renew deadline
//!   (counted from the start of its last successful renewal) it steps down, whatever the API
//!   server says: with a deadline shorter than the lease duration, the old leader has stopped
//!   before any follower may take over.
//! - On drain the holder releases the Lease (no holder), so a follower takes over at once.
//!
//! kube-rs has no leader election; `kube-lease-manager` was considered and not used: a holder
//! whose renewals fail keeps reporting itself the leader (its watch channel stays `true` while
//! it backs off), and it takes an expired lease with an unconditional patch rather than the
//! optimistic concurrency above.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where and how the replicas elect their leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (the pod's name).
    pub identity: String,
    /// How long a holder's last renewal counts (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// A holder that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often the holder renews and a follower looks.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults of Kubernetes' own controllers: 15 s, 10 s, 2 s.
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Refuses settings under which two replicas could both act as the leader.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("the leader election identity is empty (set POD_NAME or --leader-election-identity)".into());
        }
        if self.namespace.is_empty() || self.name.is_empty() {
            return Err("the Lease needs a namespace and a name".into());
        }
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            return Err(format!(
                "the lease duration must be whole seconds, at least 1 (got {:?})",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?}): a leader must stop before a follower may take over",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be above zero and shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// What this replica knows of the election.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    /// This replica holds the Lease: it alone writes to the API and speaks for the cluster.
    pub leader: bool,
    /// The holder as last read (`None`: nobody, or not read yet).
    pub holder: Option<String>,
    /// The last failure to read or write the Lease, until one succeeds.
    pub error: Option<String>,
    /// When this replica last became leader or follower (RFC 3339).
    pub since: Option<String>,
    /// How many times the Lease changed hands (`leaseTransitions`).
    pub transitions: i32,
    /// The last successful read or write of the Lease named this replica as the holder. A
    /// leader that steps down because it cannot reach the API keeps this until it reads
    /// another holder: nobody else is known to lead.
    #[serde(default)]
    pub held_last: bool,
}

/// The record as observed, and when (by this replica's clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    record: Option<LeaseSpec>,
    at: Instant,
}

/// What a read of the Lease means for a candidate.
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    /// Another holder's record is fresh: stay a follower.
    Wait(String),
    /// Take or renew it, writing this spec.
    Write(LeaseSpec),
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn holder_of(spec: Option<&LeaseSpec>) -> Option<&str> {
    spec.and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// Pure: what to do about `current`, observed unchanged since `observed.at`.
fn decide(
    cfg: &LeaseConfig,
    current: Option<&LeaseSpec>,
    observed_at: Instant,
    now: Instant,
) -> Decision {
    let holder = holder_of(current);
    let ours = holder == Some(cfg.identity.as_str());
    if let Some(h) = holder.filter(|_| !ours) {
        let duration = current
            .and_then(|s| s.lease_duration_seconds)
            .map(|d| Duration::from_secs(d.max(0) as u64))
            .unwrap_or(cfg.lease_duration);
        if observed_at + duration > now {
            return Decision::Wait(h.to_string());
        }
    }
    let stamp = now_micro();
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    Decision::Write(LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
        acquire_time: if ours {
            current.and_then(|s| s.acquire_time.clone())
        } else {
            Some(stamp.clone())
        },
        renew_time: Some(stamp),
        lease_transitions: Some(if ours || holder.is_none() && transitions == 0 {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    })
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// This replica holds the Lease now.
    Held,
    /// Another holder's record is fresh.
    Other,
    /// Another write came first (409): like a failed request, a holder keeps leading until
    /// its renew deadline and tries again.
    Conflict,
}

/// One attempt: read, then take or renew.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
    state: &mut Leadership,
) -> Result<Outcome, kube::Error> {
    let started = Instant::now();
    let Some(lease) = api.get_opt(&cfg.name).await? else {
        let Decision::Write(spec) = decide(cfg, None, started, started) else {
            unreachable!("nobody holds a missing Lease")
        };
        let new = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "meshfed".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(spec.clone()),
        };
        return match api.create(&PostParams::default(), &new).await {
            Ok(_) => {
                *observed = Some(Observed {
                    record: Some(spec),
                    at: started,
                });
                state.holder = Some(cfg.identity.clone());
                state.held_last = true;
                state.transitions = 0;
                Ok(Outcome::Held)
            }
            Err(e) if is_conflict(&e) => Ok(Outcome::Conflict),
            Err(e) => Err(e),
        };
    };
    let now = Instant::now();
    if observed.as_ref().map(|o| &o.record) != Some(&lease.spec) {
        *observed = Some(Observed {
            record: lease.spec.clone(),
            at: now,
        });
    }
    let at = observed.as_ref().map(|o| o.at).unwrap_or(now);
    state.holder = holder_of(lease.spec.as_ref()).map(str::to_string);
    state.held_last = state.holder.as_deref() == Some(cfg.identity.as_str());
    state.transitions = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    match decide(cfg, lease.spec.as_ref(), at, now) {
        Decision::Wait(_) => Ok(Outcome::Other),
        Decision::Write(spec) => {
            let new = Lease {
                metadata: lease.metadata.clone(),
                spec: Some(spec.clone()),
            };
            match api.replace(&cfg.name, &PostParams::default(), &new).await {
                Ok(_) => {
                    state.holder = Some(cfg.identity.clone());
                    state.held_last = true;
                    state.transitions = spec.lease_transitions.unwrap_or(0);
                    *observed = Some(Observed {
                        record: Some(spec),
                        at: started,
                    });
                    Ok(Outcome::Held)
                }
                Err(e) if is_conflict(&e) => Ok(Outcome::Conflict),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the Lease up (no holder, renewed now) if this replica still holds it.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    if holder_of(lease.spec.as_ref()) != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    let mut spec = lease.spec.clone().unwrap_or_default();
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(1);
    let new = Lease {
        metadata: lease.metadata,
        spec: Some(spec),
    };
    api.replace(&cfg.name, &PostParams::default(), &new)
        .await
        .map(|_| ())
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs the election until `stop` resolves, publishing every change of [`Leadership`] on
/// `tx`; on `stop` the holder releases the Lease (and says it is no longer the leader).
pub async fn run(
    client: kube::Client,
    cfg: LeaseConfig,
    tx: watch::Sender<Leadership>,
    stop: impl std::future::Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed = None;
    let mut state = tx.borrow().clone();
    // The start of the last successful renewal: the step-down deadline counts from it.
    let mut renewed_at: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        let attempt = Instant::now();
        let deadline = renewed_at.map(|r| r + cfg.renew_deadline);
        // One attempt may take up to the renew deadline (a slow API server still elects a
        // leader); a holder's deadline cuts it short.
        let result = tokio::select! {
            r = tokio::time::timeout(cfg.renew_deadline, try_acquire_or_renew(&api, &cfg, &mut observed, &mut state)) => Some(r),
            _ = sleep_until(deadline) => None,
            _ = &mut stop => break,
        };
        let still_in_term = |renewed_at: Option<Instant>| {
            renewed_at.is_some_and(|r| r + cfg.renew_deadline > Instant::now())
        };
        let leader = match result {
            Some(Ok(Ok(Outcome::Held))) => {
                state.error = None;
                renewed_at = Some(attempt);
                true
            }
            Some(Ok(Ok(Outcome::Other))) => {
                state.error = None;
                false
            }
            // A lost race is normal for a candidate; for a holder it is a failed renewal.
            Some(Ok(Ok(Outcome::Conflict))) => {
                state.error = renewed_at.map(|_| {
                    format!(
                        "Lease {}/{}: another write came first (409)",
                        cfg.namespace, cfg.name
                    )
                });
                still_in_term(renewed_at)
            }
            Some(Ok(Err(e))) => {
                state.error = Some(format!("Lease {}/{}: {e}", cfg.namespace, cfg.name));
                still_in_term(renewed_at)
            }
            Some(Err(_)) => {
                state.error = Some(format!(
                    "Lease {}/{}: no answer within {:?}",
                    cfg.namespace, cfg.name, cfg.renew_deadline
                ));
                still_in_term(renewed_at)
            }
            None => false,
        };
        if !leader && renewed_at.take().is_some() {
            tracing::warn!(lease = %cfg.name, holder = ?state.holder, error = ?state.error,
                "lost the leader election: this replica stops writing and observes");
        }
        if leader != state.leader || state.since.is_none() {
            if leader {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "this replica is the leader");
            }
            state.leader = leader;
            state.since = Some(rfc3339_now());
        }
        tx.send_if_modified(|s| {
            if *s != state {
                *s = state.clone();
                true
            } else {
                false
            }
        });
        // A follower looks again a little later than the holder renews, spread so replicas
        // that started together do not ask together.
        let wait = if leader {
            cfg.retry_period
        } else {
            cfg.retry_period.mul_f64(1.0 + rand::random::<f64>() * 0.2)
        };
        tokio::select! {
            _ = tokio::time::sleep_until(attempt + wait) => {}
            _ = sleep_until(renewed_at.map(|r| r + cfg.renew_deadline)) => {}
            _ = &mut stop => break,
        }
    }
    if state.leader || state.held_last {
        state.leader = false;
        state.held_last = false;
        state.since = Some(rfc3339_now());
        tx.send_replace(state);
        match tokio::time::timeout(cfg.retry_period, release(&api, &cfg)).await {
            Ok(Ok(())) => tracing::info!(lease = %cfg.name, "released the Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the Lease; a follower takes it when it expires"),
            Err(_) => tracing::warn!("the API server did not answer the release; a follower takes the Lease when it expires"),
        }
    }
}

/// Sleeps until `t`, or forever without one.
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig::new("meshfed-system", "meshfed-agent", id)
    }

    fn held_by(h: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(h.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(now_micro()),
            acquire_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_record_of_another_holder_is_waited_for_by_the_observers_clock() {
        let c = cfg("b");
        let seen = Instant::now();
        let other = held_by("a", 3);
        assert_eq!(
            decide(&c, Some(&other), seen, seen + Duration::from_secs(14)),
            Decision::Wait("a".into())
        );
        // Unchanged for the whole lease duration: taken, one more transition.
        let Decision::Write(spec) = decide(&c, Some(&other), seen, seen + Duration::from_secs(15))
        else {
            panic!("an expired lease is taken")
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time_and_nobodys_lease_is_taken_at_once() {
        let c = cfg("a");
        let now = Instant::now();
        let mine = held_by("a", 3);
        let Decision::Write(spec) = decide(&c, Some(&mine), now, now) else {
            panic!("the holder renews")
        };
        assert_eq!(spec.acquire_time, mine.acquire_time);
        assert_eq!(spec.lease_transitions, Some(3));
        let released = LeaseSpec {
            holder_identity: None,
            lease_transitions: Some(3),
            ..held_by("x", 3)
        };
        let Decision::Write(spec) = decide(&cfg("b"), Some(&released), now, now) else {
            panic!("a released lease is taken at once")
        };
        assert_eq!(spec.lease_transitions, Some(4));
        let empty = LeaseSpec {
            holder_identity: Some(String::new()),
            ..Default::default()
        };
        assert!(matches!(
            decide(&cfg("b"), Some(&empty), now, now),
            Decision::Write(_)
        ));
    }

    #[test]
    fn settings_where_two_leaders_could_overlap_are_refused() {
        let mut c = cfg("a");
        assert!(c.validate().is_ok());
        c.renew_deadline = c.lease_duration;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("shorter than the lease duration"));
        let mut c = cfg("a");
        c.retry_period = c.renew_deadline;
        assert!(c.validate().unwrap_err().contains("retry period"));
        let mut c = cfg("a");
        c.lease_duration = Duration::from_millis(1500);
        assert!(c.validate().unwrap_err().contains("whole seconds"));
        assert!(cfg("").validate().unwrap_err().contains("identity"));
    }
}
