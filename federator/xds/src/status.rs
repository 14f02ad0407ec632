//! Per-proxy xDS state: subscriptions, what was sent, ACK/NACK per type. It is both the
//! stream's working state and what `meshfed proxy-status` and `proxy-config` report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::node::ProxyNode;
use super::resources::SharedRes;
use super::Kind;

#[derive(Debug, Default)]
pub struct TypeState {
    /// The client asked for this type at least once.
    pub subscribed: bool,
    pub wildcard: bool,
    pub names: BTreeSet<String>,
    /// What the proxy holds, as far as we know: name -> resource last sent.
    pub sent: BTreeMap<Arc<str>, SharedRes>,
    pub version: String,
    pub nonce: String,
    pub sent_at: Option<Instant>,
    pub acked_version: String,
    pub acked_nonce: String,
    pub nack: Option<String>,
    pub nacks: u64,
}

impl TypeState {
    pub fn sync(&self) -> SyncState {
        if self.nonce.is_empty() {
            SyncState::NotSent
        } else if self.nack.is_some() {
            SyncState::Nack
        } else if self.acked_nonce == self.nonce {
            SyncState::Synced
        } else {
            SyncState::Stale
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    Synced,
    Stale,
    Nack,
    NotSent,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nack => "NACK",
            SyncState::NotSent => "NOT SENT",
        })
    }
}

/// One connected ADS stream.
#[derive(Debug)]
pub struct Conn {
    pub conn_id: u64,
    pub node: ProxyNode,
    /// The SPIFFE ID of the client certificate (mTLS port).
    pub peer_id: Option<String>,
    pub remote: Option<SocketAddr>,
    pub delta: bool,
    pub connected_at: SystemTime,
    types: Mutex<BTreeMap<Kind, TypeState>>,
}

impl Conn {
    pub fn types(&self) -> MutexGuard<'_, BTreeMap<Kind, TypeState>> {
        self.types.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TypeReport {
    pub state: SyncState,
    pub sent_version: String,
    pub acked_version: String,
    pub resources: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub nacks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyReport {
    pub proxy: String,
    pub connection: u64,
    pub flavor: String,
    pub kind: String,
    pub locality: String,
    pub network: String,
    pub cluster: String,
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub types: BTreeMap<String, TypeReport>,
}

/// Every connected proxy. Subscribers are told of every change: a proxy connected or left, an
/// ACK or NACK recorded (what `/debug/syncz` and `proxy-status` show).
#[derive(Debug)]
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            next: AtomicU64::new(0),
            conns: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Registry {
    /// A receiver notified after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tells subscribers that something they can observe changed.
    pub fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn conns(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(
        &self,
        node: ProxyNode,
        peer_id: Option<String>,
        remote: Option<SocketAddr>,
        delta: bool,
    ) -> Arc<Conn> {
        let conn_id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let c = Arc::new(Conn {
            conn_id,
            node,
            peer_id,
            remote,
            delta,
            connected_at: SystemTime::now(),
            types: Mutex::new(BTreeMap::new()),
        });
        self.conns().insert(conn_id, c.clone());
        self.notify();
        c
    }

    pub fn remove(&self, conn_id: u64) {
        self.conns().remove(&conn_id);
        self.notify();
    }

    pub fn len(&self) -> usize {
        self.conns().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<Conn>> {
        self.conns().values().cloned().collect()
    }

    pub fn report(&self) -> Vec<ProxyReport> {
        self.all()
            .into_iter()
            .map(|c| {
                let types = c
                    .types()
                    .iter()
                    .filter(|(_, t)| t.subscribed)
                    .map(|(k, t)| {
                        (
                            k.short().to_string(),
                            TypeReport {
                                state: t.sync(),
                                sent_version: t.version.clone(),
                                acked_version: t.acked_version.clone(),
                                resources: t.sent.len(),
                                error: t.nack.clone(),
                                nacks: t.nacks,
                            },
                        )
                    })
                    .collect();
                ProxyReport {
                    proxy: c.node.id.clone(),
                    connection: c.conn_id,
                    flavor: format!("{:?}", c.node.flavor).to_lowercase(),
                    kind: format!("{:?}", c.node.kind).to_lowercase(),
                    locality: c.node.locality.to_string(),
                    network: c.node.network.clone(),
                    cluster: c.node.cluster.clone(),
                    stream: if c.delta { "delta" } else { "sotw" }.into(),
                    identity: c.peer_id.clone(),
                    types,
                }
            })
            .collect()
    }

    /// What was sent to the proxy (by node id, or a unique prefix of it), as canonical JSON.
    pub fn config_dump(
        &self,
        proxy: &str,
        kind: Option<Kind>,
    ) -> Result<serde_json::Value, String> {
        let all = self.all();
        let exact: Vec<&Arc<Conn>> = all.iter().filter(|c| c.node.id == proxy).collect();
        let hits: Vec<&Arc<Conn>> = if exact.is_empty() {
            all.iter()
                .filter(|c| c.node.id.starts_with(proxy))
                .collect()
        } else {
            exact
        };
        let conns: Vec<&Arc<Conn>> = match hits.as_slice() {
            [] => return Err(format!("no connected proxy is named {proxy:?}")),
            // Several streams of one proxy (ADS and SDS, or a reconnect): each type from the
            // newest stream that carries it.
            many if many.iter().all(|c| c.node.id == many[0].node.id) => many.to_vec(),
            many => {
                return Err(format!(
                    "{proxy:?} names {} proxies: {}",
                    many.len(),
                    many.iter()
                        .map(|c| c.node.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        };
        let mut out = serde_json::Map::new();
        out.insert("proxy".into(), conns[0].node.id.clone().into());
        for c in conns {
            let types = c.types();
            for (k, t) in types.iter() {
                if kind.is_some_and(|want| want != *k) || !t.subscribed {
                    continue;
                }
                let list: Vec<serde_json::Value> = t
                    .sent
                    .values()
                    .map(|r| {
                        let mut v = super::json::any_to_json(&r.any)
                            .unwrap_or_else(|e| serde_json::json!({"error": e}));
                        // Like Envoy's own config dump: never a private key.
                        super::secrets::redact(&mut v);
                        v
                    })
                    .collect();
                out.insert(k.short().into(), serde_json::Value::Array(list));
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}
