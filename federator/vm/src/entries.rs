//! The agent's store of auto-registered WorkloadEntries (the VM registration source): created
//! from a WorkloadGroup's template when a VM connects, kept while it is connected, marked
//! `disconnectedAt` when its stream ends and deleted after the grace period unless it comes back.
//! Stored in the agent's sled cache so a restarted agent keeps them (their VMs get a fresh grace
//! period to reconnect). Changes are published on a watch; the registry view turns them into
//! endpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshfed_model::entry::{
    rfc3339, AutoEntry, CONNECTED_AT_ANNOTATION, DISCONNECTED_AT_ANNOTATION,
};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EntryError {
    #[error("WorkloadEntry {name} is held by another connected VM ({vm}); two VMs of one group and network cannot share the address {address}")]
    Taken {
        name: String,
        vm: String,
        address: String,
    },
    #[error("storing the WorkloadEntry: {0}")]
    Store(String),
}

/// The auto-registered entries of this cluster.
#[derive(Debug)]
pub struct Entries {
    tree: sled::Tree,
    state: Mutex<BTreeMap<String, AutoEntry>>,
    tx: watch::Sender<Arc<BTreeMap<String, AutoEntry>>>,
    next_conn: AtomicU64,
}

impl Entries {
    /// Opens the stored entries. Those that were connected lost their stream with the previous
    /// process: they start their grace period now.
    pub fn open(tree: sled::Tree, now: i64) -> anyhow::Result<Self> {
        let mut state = BTreeMap::new();
        for kv in tree.iter() {
            let (_, v) = kv?;
            let mut e: AutoEntry = serde_json::from_slice(&v)?;
            if e.connected {
                e.connected = false;
                e.disconnected_at_ms = Some(now);
                e.annotations.remove(CONNECTED_AT_ANNOTATION);
                e.annotations
                    .insert(DISCONNECTED_AT_ANNOTATION.into(), rfc3339(now));
            }
            state.insert(e.name.clone(), e);
        }
        let me = Entries {
            tree,
            tx: watch::Sender::new(Arc::new(state.clone())),
            state: Mutex::new(state),
            next_conn: AtomicU64::new(1),
        };
        let all: Vec<AutoEntry> = me.lock().values().cloned().collect();
        for e in &all {
            me.store(e)?;
        }
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AutoEntry>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, e: &AutoEntry) -> Result<(), EntryError> {
        let v = serde_json::to_vec(e).map_err(|x| EntryError::Store(x.to_string()))?;
        self.tree
            .insert(e.name.as_bytes(), v)
            .map_err(|x| EntryError::Store(x.to_string()))?;
        self.tree
            .flush()
            .map_err(|x| EntryError::Store(x.to_string()))?;
        Ok(())
    }

    fn publish(&self, state: &BTreeMap<String, AutoEntry>) {
        self.tx.send_replace(Arc::new(state.clone()));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<BTreeMap<String, AutoEntry>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<BTreeMap<String, AutoEntry>> {
        self.tx.borrow().clone()
    }

    /// Registers (or re-registers) a VM's entry; returns the connection number that owns it.
    /// A reconnecting VM keeps its last health report until it sends a new one.
    pub fn connect(&self, mut e: AutoEntry) -> Result<u64, EntryError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(old) = st.get(&e.name) {
            if old.connected && old.vm_id != e.vm_id {
                return Err(EntryError::Taken {
                    name: e.name.clone(),
                    vm: old.vm_id.clone(),
                    address: e.address.clone(),
                });
            }
            if old.vm_id == e.vm_id {
                e.healthy = old.healthy;
                e.health_message = old.health_message.clone();
            }
        }
        // The same VM under another name (its address or network changed): the old one goes.
        let stale: Vec<String> = st
            .values()
            .filter(|o| o.vm_id == e.vm_id && o.name != e.name)
            .map(|o| o.name.clone())
            .collect();
        for n in stale {
            st.remove(&n);
            let _ = self.tree.remove(n.as_bytes());
        }
        e.conn = conn;
        e.connected = true;
        e.disconnected_at_ms = None;
        e.annotations.remove(DISCONNECTED_AT_ANNOTATION);
        self.store(&e)?;
        st.insert(e.name.clone(), e);
        self.publish(&st);
        Ok(conn)
    }

    /// Records a health report from the stream `conn`; `false` if that stream no longer owns
    /// the entry.
    pub fn health(&self, name: &str, conn: u64, healthy: bool, message: &str) -> bool {
        let mut st = self.lock();
        let Some(e) = st.get_mut(name).filter(|e| e.conn == conn) else {
            return false;
        };
        if e.healthy == Some(healthy) && e.health_message == message {
            return true;
        }
        e.healthy = Some(healthy);
        e.health_message = message.to_string();
        let e = e.clone();
        let _ = self.store(&e);
        self.publish(&st);
        true
    }

    /// The stream `conn` ended: the entry starts its grace period.
    pub fn disconnect(&self, name: &str, conn: u64, now: i64) {
        let mut st = self.lock();
        let Some(e) = st.get_mut(name).filter(|e| e.conn == conn && e.connected) else {
            return;
        };
        e.connected = false;
        e.disconnected_at_ms = Some(now);
        e.annotations.remove(CONNECTED_AT_ANNOTATION);
        e.annotations
            .insert(DISCONNECTED_AT_ANNOTATION.into(), rfc3339(now));
        let e = e.clone();
        let _ = self.store(&e);
        self.publish(&st);
    }

    /// Deletes entries disconnected for longer than `grace_ms`, and entries whose group no
    /// longer exists (`groups` holds `ns/name` keys). Returns the deleted names.
    pub fn sweep(
        &self,
        now: i64,
        grace_ms: i64,
        groups: Option<&std::collections::BTreeSet<String>>,
    ) -> Vec<String> {
        let mut st = self.lock();
        let gone: Vec<String> = st
            .values()
            .filter(|e| {
                e.disconnected_at_ms.is_some_and(|t| now - t >= grace_ms)
                    || groups.is_some_and(|g| {
                        !g.contains(&meshfed_model::validate::service_key(
                            &e.namespace,
                            &e.group,
                        ))
                    })
            })
            .map(|e| e.name.clone())
            .collect();
        for n in &gone {
            st.remove(n);
            let _ = self.tree.remove(n.as_bytes());
        }
        if !gone.is_empty() {
            let _ = self.tree.flush();
            self.publish(&st);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_model::entry::build;
    use meshfed_model::entry::testing::{facts, group};

    #[test]
    fn lifecycle_with_grace_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let es = Entries::open(db.open_tree("e").unwrap(), 0).unwrap();
        let e = build(&group(true), &facts("10.9.0.2", ""), "c", 0);
        let c1 = es.connect(e.clone()).unwrap();
        assert!(es.health(&e.name, c1, true, ""));
        assert!(es.current()[&e.name].serving());
        // Another VM cannot take a connected VM's name.
        let mut other = e.clone();
        other.vm_id = "vm2".into();
        assert!(matches!(es.connect(other), Err(EntryError::Taken { .. })));
        // Reconnect: the new stream owns it; the old one's reports are ignored.
        let c2 = es.connect(e.clone()).unwrap();
        assert!(!es.health(&e.name, c1, false, "old"));
        assert!(
            es.current()[&e.name].serving(),
            "health kept across reconnects"
        );
        es.disconnect(&e.name, c1, 100);
        assert!(
            es.current()[&e.name].connected,
            "an old stream cannot disconnect"
        );
        es.disconnect(&e.name, c2, 100);
        let cur = es.current();
        assert!(!cur[&e.name].connected);
        assert!(cur[&e.name]
            .annotations
            .contains_key(DISCONNECTED_AT_ANNOTATION));
        assert!(
            es.sweep(10_099, 10_000, None).is_empty(),
            "within the grace period"
        );
        assert_eq!(es.sweep(10_100, 10_000, None), vec![e.name.clone()]);
        assert!(es.current().is_empty());

        // Stored: a restarted agent keeps the entry and gives it a grace period.
        let c3 = es.connect(e.clone()).unwrap();
        assert!(es.health(&e.name, c3, true, ""));
        drop(es);
        let es = Entries::open(db.open_tree("e").unwrap(), 5_000).unwrap();
        let got = &es.current()[&e.name];
        assert!(!got.connected && got.disconnected_at_ms == Some(5_000));
        assert_eq!(got.healthy, Some(true));
        // A group that disappears takes its entries with it.
        let groups = std::collections::BTreeSet::new();
        assert_eq!(es.sweep(5_001, 10_000, Some(&groups)).len(), 1);
    }
}
