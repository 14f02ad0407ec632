//! The model's store: one writer per source, cheap read-only handles for everyone else (the
//! shape of kube-runtime's reflector store).
//!
//! [`new`] returns the two writers and a [`Reader`]. The [`LocalWriter`] belongs to the source of
//! the cluster's own services (the registry and the auto-registered WorkloadEntries; next the
//! Kubernetes source) and can change only [`Snapshot::local`]. The [`FederationWriter`] belongs
//! to the federation sync and can change only what the federation says: imports, peers, bundles,
//! the connection flag and the applied revision. Neither is `Clone`, so each part of the model has
//! exactly one writer. Readers (xDS, DNS, the VM API, status) clone the [`Reader`] freely, read
//! the current [`Snapshot`] without locking and subscribe to changes; a write that changes
//! nothing publishes nothing.
//!
//! Each writer marks itself ready once its source has said what it knows (a first registry load,
//! the imports restored from the cache). [`Reader::wait_until_ready`] returns once both have.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::{PeerCluster, ServiceExport};
use tokio::sync::watch;

use crate::snapshot::Snapshot;

#[derive(Debug)]
struct Shared {
    snap: watch::Sender<Arc<Snapshot>>,
    /// (local ready, federation ready)
    ready: watch::Sender<(bool, bool)>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Snapshot)) -> bool {
        self.snap.send_if_modified(|cur| {
            let mut next = Snapshot::clone(cur);
            f(&mut next);
            if next == **cur {
                false
            } else {
                *cur = Arc::new(next);
                true
            }
        })
    }
}

/// Creates the store with `initial` (facts, and whatever a cache restored).
pub fn new(initial: Snapshot) -> (LocalWriter, FederationWriter, Reader) {
    let shared = Arc::new(Shared {
        snap: watch::Sender::new(Arc::new(initial)),
        ready: watch::Sender::new((false, false)),
    });
    (
        LocalWriter {
            shared: shared.clone(),
        },
        FederationWriter {
            shared: shared.clone(),
        },
        Reader { shared },
    )
}

/// A read-only handle. Cloning is cheap; every clone sees the same snapshots.
#[derive(Debug, Clone)]
pub struct Reader {
    shared: Arc<Shared>,
}

impl Reader {
    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.shared.snap.borrow().clone()
    }

    /// A receiver that is notified of every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snap.subscribe()
    }

    /// Whether both sources have marked themselves ready.
    pub fn is_ready(&self) -> bool {
        let (l, f) = *self.shared.ready.borrow();
        l && f
    }

    /// Returns once both sources have marked themselves ready.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        // The senders live as long as `self.shared`, so `wait_for` cannot fail while we hold it.
        let _ = rx.wait_for(|(l, f)| *l && *f).await;
    }
}

/// The only writer of the cluster's own services.
#[derive(Debug)]
pub struct LocalWriter {
    shared: Arc<Shared>,
}

impl LocalWriter {
    /// Replaces the cluster's own services (by `ns/name`) and which of them are exported.
    /// Returns whether anything changed.
    pub fn set_local(&self, local: crate::snapshot::Services, exported: BTreeSet<String>) -> bool {
        self.shared.update(|s| {
            s.local = local;
            s.exported = exported;
        })
    }

    pub fn mark_ready(&self) {
        self.shared
            .ready
            .send_if_modified(|r| !std::mem::replace(&mut r.0, true));
    }

    pub fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }
}

/// What the federation writer may change.
#[derive(Debug)]
pub struct Imported<'a> {
    /// Imported services by (source cluster, `ns/name`).
    pub imports: &'a mut BTreeMap<(String, String), Arc<ServiceExport>>,
    pub peers: &'a mut BTreeMap<String, PeerCluster>,
    /// Peer trust bundles: trust domain -> JSON.
    pub bundles: &'a mut BTreeMap<String, String>,
    pub federator_connected: &'a mut bool,
    pub applied_revision: &'a mut u64,
}

/// The only writer of what the federation says.
#[derive(Debug)]
pub struct FederationWriter {
    shared: Arc<Shared>,
}

impl FederationWriter {
    /// Applies `f` to a copy of the federation's part and publishes it if it changed. Returns
    /// whether anything changed.
    pub fn update(&self, f: impl FnOnce(Imported<'_>)) -> bool {
        self.shared.update(|s| {
            f(Imported {
                imports: &mut s.imports,
                peers: &mut s.peers,
                bundles: &mut s.bundles,
                federator_connected: &mut s.federator_connected,
                applied_revision: &mut s.applied_revision,
            })
        })
    }

    pub fn mark_ready(&self) {
        self.shared
            .ready
            .send_if_modified(|r| !std::mem::replace(&mut r.1, true));
    }

    pub fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_changes_and_not_no_ops() {
        let (_local, fed, reader) = new(Snapshot::default());
        let mut rx = reader.subscribe();
        assert!(fed.update(|i| *i.applied_revision = 3));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().applied_revision, 3);
        assert!(!fed.update(|i| *i.applied_revision = 3));
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn each_writer_changes_only_its_part() {
        let (local, fed, reader) = new(Snapshot::default());
        let svc = ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            ..Default::default()
        };
        local.set_local(
            [("shop/payment".to_string(), Arc::new(svc.clone()))].into(),
            BTreeSet::new(),
        );
        fed.update(|i| {
            i.imports.insert(
                ("east".into(), "shop/payment".into()),
                Arc::new(svc.clone()),
            );
        });
        let s = reader.current();
        assert_eq!(s.local.len(), 1);
        assert_eq!(s.imports.len(), 1);
        // A new local view leaves the imports alone, and the other way round.
        local.set_local(BTreeMap::new(), BTreeSet::new());
        let s = reader.current();
        assert!(s.local.is_empty());
        assert_eq!(s.imports.len(), 1);
    }

    #[tokio::test]
    async fn ready_when_both_sources_are() {
        let (local, fed, reader) = new(Snapshot::default());
        let r = reader.clone();
        let waiter = tokio::spawn(async move { r.wait_until_ready().await });
        local.mark_ready();
        assert!(!reader.is_ready());
        assert!(!waiter.is_finished());
        fed.mark_ready();
        waiter.await.unwrap();
        assert!(reader.is_ready());
    }
}
