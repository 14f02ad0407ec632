//! The store on etcd, for federator replicas (`meshfed federator --store etcd`).
//!
//! Keys, under the prefix (default `/meshfed`):
//! - `meta/schema`: the schema version (text); `meta/head`: the head revision (text)
//! - `clusters/<id>`: a [`ClusterRecord`] (JSON); `acked/<id>`: its acknowledged import revision
//! - `exports/<cluster>/<ns>/<name>`: an [`ExportRecord`] (the sled store's protobuf encoding)
//!
//! Writes: every write is one etcd transaction that compares `meta/head`'s mod revision with
//! the one this replica's view holds and rewrites `meta/head` with what it puts. A replica
//! whose view is behind loses the compare, waits until its watch delivers the winner's write
//! and plans again; so writes from all replicas are serialized exactly as one process's are,
//! conflicts and revisions are computed from the latest state, and the head revision (the
//! import feed's cursor) means the same on every replica. A write returns only after etcd
//! committed it; with etcd unreachable it fails within the timeout and nothing is acknowledged.
//! `acked/<id>` is written alone, without the compare (losing one costs a resend).
//!
//! Reads: the view is loaded page by page at one etcd revision, then follows the prefix with a
//! watch from the next revision; the watch is the only writer of the view, and a write returns
//! once the watch has applied it. A watch compacted past its revision reloads the view.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};

use crate::{
    export_key, ClusterRecord, ExportRecord, Mem, Plan, Result, StoreError, Version, SCHEMA_VERSION,
};
use meshfed_model::validate::service_key;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/meshfed";
/// How long one etcd request may take before the write fails (and is not acknowledged).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message read from etcd (a page of the initial load, a watch response carrying
/// one large transaction).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Keys per page of the initial load.
const PAGE: i64 = 1000;

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` or `http(s)://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Every key lives under it; several federations may share one etcd with different ones.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Per request.
    pub timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// mTLS to etcd: the CA that signed etcd's serving certificates, and this client's certificate.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

enum Key<'a> {
    Schema,
    Head,
    Floor,
    Cluster,
    Acked(&'a str),
    Live(&'a str),
    Export(&'a str, &'a str),
    Other,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
    fn schema(&self) -> String {
        format!("{}/meta/schema", self.prefix)
    }
    fn head(&self) -> String {
        format!("{}/meta/head", self.prefix)
    }
    fn floor(&self) -> String {
        format!("{}/meta/floor", self.prefix)
    }
    fn cluster(&self, id: &str) -> String {
        format!("{}/clusters/{id}", self.prefix)
    }
    fn acked(&self, id: &str) -> String {
        format!("{}/acked/{id}", self.prefix)
    }
    fn live(&self, id: &str) -> String {
        format!("{}/live/{id}", self.prefix)
    }
    fn export(&self, cluster: &str, skey: &str) -> String {
        format!("{}/exports/{cluster}/{skey}", self.prefix)
    }
    /// Keys of other parts of meshfed under the same prefix (tokens, the CA).
    pub(crate) fn other(&self, part: &str) -> String {
        format!("{}/{part}", self.prefix)
    }
    fn parse<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Ok(k) = std::str::from_utf8(key) else {
            return Key::Other;
        };
        let Some(rest) = k
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Key::Other;
        };
        match rest.split_once('/') {
            Some(("meta", "schema")) => Key::Schema,
            Some(("meta", "head")) => Key::Head,
            Some(("meta", "floor")) => Key::Floor,
            Some(("clusters", _)) => Key::Cluster,
            Some(("acked", id)) => Key::Acked(id),
            Some(("live", id)) => Key::Live(id),
            Some(("exports", r)) => match r.split_once('/') {
                Some((cluster, skey)) => Key::Export(cluster, skey),
                None => Key::Other,
            },
            _ => Key::Other,
        }
    }
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn etcd_err(what: &str, e: etcd_client::Error) -> StoreError {
    let text = e.to_string();
    // etcd's own limits on one transaction: name the flags that raise them.
    if text.contains("too many operations in txn request") {
        return StoreError::EtcdLimit(format!(
            "{what}: {text}; run etcd with a larger --max-txn-ops (meshfed writes one key per service changed, see docs/federation-protocol.md)"
        ));
    }
    if text.contains("request is too large") || text.contains("message larger than max") {
        return StoreError::EtcdLimit(format!(
            "{what}: {text}; run etcd with a larger --max-request-bytes (see docs/federation-protocol.md)"
        ));
    }
    StoreError::Etcd {
        what: what.to_string(),
        message: text,
    }
}

fn timed_out(what: &str, t: Duration) -> StoreError {
    StoreError::Etcd {
        what: what.to_string(),
        message: format!("no answer from etcd within {t:?}"),
    }
}

fn corrupt_key(key: &[u8], reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn parse_u64(kv: &KeyValue) -> Result<u64> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt_key(kv.key(), "not a number"))
}

/// Applies one key's value to the view. Acknowledged revisions of clusters not (yet) in the
/// view are returned for a second pass (at load, `acked/` sorts before `clusters/`).
fn apply_put(mem: &mut Mem, keys: &Keys, kv: &KeyValue) -> Result<Option<(String, u64)>> {
    match keys.parse(kv.key()) {
        Key::Schema => {
            let found = parse_u64(kv)?;
            if found != u64::from(SCHEMA_VERSION) {
                return Err(StoreError::Schema {
                    dir: format!("etcd prefix {}", keys.prefix),
                    found: u32::try_from(found).unwrap_or(u32::MAX),
                });
            }
        }
        Key::Head => {
            mem.head = parse_u64(kv)?;
            mem.head_mod = kv.mod_revision();
        }
        Key::Floor => {
            mem.floor = mem.floor.max(parse_u64(kv)?);
        }
        Key::Cluster => {
            let rec: ClusterRecord =
                serde_json::from_slice(kv.value()).map_err(|e| corrupt_key(kv.key(), e))?;
            mem.put_cluster(rec);
        }
        Key::Acked(id) => {
            let v = parse_u64(kv)?;
            match mem.clusters.get_mut(id) {
                Some(c) => c.imports_acked_revision = v,
                None => return Ok(Some((id.to_string(), v))),
            }
        }
        Key::Live(id) => {
            mem.live.insert(id.to_string());
        }
        Key::Export(cluster, skey) => {
            let r = ExportRecord::decode(&export_key(cluster, skey), kv.value())?;
            mem.put_export(r);
        }
        Key::Other => {}
    }
    Ok(None)
}

/// A deleted key: liveness keys (by etcd, when their lease expires) and compacted tombstones.
fn apply_delete(mem: &mut Mem, keys: &Keys, kv: &KeyValue) {
    match keys.parse(kv.key()) {
        Key::Live(id) => {
            mem.live.remove(id);
        }
        Key::Export(cluster, skey) => mem.drop_export(cluster, skey),
        _ => {}
    }
}

/// The etcd revision the view has applied, and a condition writers wait on.
#[derive(Default)]
struct Applied {
    rev: Mutex<i64>,
    moved: Condvar,
}

impl Applied {
    fn set(&self, rev: i64) {
        let mut r = self.rev.lock().unwrap_or_else(|p| p.into_inner());
        if rev > *r {
            *r = rev;
            self.moved.notify_all();
        }
    }

    /// Waits until the view has applied `rev`; false if it did not within `t`.
    fn wait(&self, rev: i64, t: Duration) -> bool {
        let r = self.rev.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .moved
            .wait_timeout_while(r, t, |r| *r < rev)
            .unwrap_or_else(|p| p.into_inner());
        *r >= rev
    }
}

/// What the replica's link to etcd is like.
#[derive(Default)]
struct Health {
    /// Why the view is not following etcd, since when.
    broken: Option<(String, std::time::SystemTime)>,
    /// Whole reloads of the view (its watch was compacted away).
    reloads: u64,
}

/// A connection to etcd: the client, on a runtime of its own on its own thread (the store's
/// methods are synchronous and may be called from any thread, inside a runtime or not).
pub struct Conn {
    handle: tokio::runtime::Handle,
    /// Ends the runtime thread when the last user is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
    client: Client,
    kv: KvClient,
    keys: Keys,
    timeout: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

impl Conn {
    /// Connects to `cfg`'s endpoints (the first request proves etcd answers).
    pub fn open(cfg: &EtcdConfig) -> Result<Arc<Conn>> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Etcd {
                what: "configuration".into(),
                message: "no etcd endpoints given".into(),
            });
        }
        let start_err = |e: String| StoreError::Etcd {
            what: "start".into(),
            message: e,
        };
        let (htx, hrx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("meshfed-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = htx.send(Err(e));
                        return;
                    }
                };
                let _ = htx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| start_err(e.to_string()))?;
        let handle = hrx
            .recv()
            .map_err(|e| start_err(e.to_string()))?
            .map_err(|e| start_err(e.to_string()))?;
        let opts = connect_options(cfg)?;
        let endpoints = cfg.endpoints.clone();
        let timeout = cfg.timeout;
        let client = run(&handle, async move {
            tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
                .await
                .map_err(|_| timed_out("connect", timeout))?
                .map_err(|e| etcd_err("connect", e))
        })??;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Arc::new(Conn {
            handle,
            _stop: stop,
            client,
            kv,
            keys: Keys::new(&cfg.prefix),
            timeout,
        }))
    }

    /// Runs one request on the connection's runtime, within the timeout.
    fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(
                KvClient,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = std::result::Result<T, etcd_client::Error>> + Send>,
            > + Send
            + 'static,
    ) -> Result<T> {
        let kv = self.kv.clone();
        let timeout = self.timeout;
        run(&self.handle, async move {
            tokio::time::timeout(timeout, f(kv))
                .await
                .map_err(|_| timed_out(what, timeout))?
                .map_err(|e| etcd_err(what, e))
        })?
    }
}

pub(crate) struct Etcd {
    conn: Arc<Conn>,
    applied: Arc<Applied>,
    health: Arc<Mutex<Health>>,
}

impl Etcd {
    /// Connects, checks the schema (writing it into an empty prefix), loads the view and starts
    /// following the prefix.
    pub(crate) fn open(
        cfg: &EtcdConfig,
        mem: Arc<RwLock<Mem>>,
        version: tokio::sync::watch::Sender<Version>,
    ) -> Result<Self> {
        let conn = Conn::open(cfg)?;
        let keys = conn.keys.clone();
        // An empty prefix gets the schema; another schema is refused before anything is read.
        let k = keys.schema();
        conn.call("schema", move |mut kv| {
            Box::pin(async move {
                kv.txn(
                    Txn::new()
                        .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(k, SCHEMA_VERSION.to_string(), None)]),
                )
                .await
            })
        })?;
        let timeout = conn.timeout;
        let (loaded, rev) = {
            let mut kv = conn.kv.clone();
            let keys = keys.clone();
            run(&conn.handle, async move {
                tokio::time::timeout(timeout * 4, load(&mut kv, &keys))
                    .await
                    .map_err(|_| timed_out("load", timeout * 4))?
            })??
        };
        let v = Version {
            head: loaded.head,
            clusters: loaded.cluster_changes,
            following: true,
        };
        *mem.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        version.send_replace(v);
        let applied = Arc::new(Applied::default());
        applied.set(rev);
        let health = Arc::new(Mutex::new(Health::default()));
        let watch = conn
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        conn.handle.spawn(follow(Follow {
            watch,
            kv: conn.kv.clone(),
            keys,
            mem,
            version,
            applied: applied.clone(),
            health: health.clone(),
            rev,
            timeout,
        }));
        Ok(Etcd {
            conn,
            applied,
            health,
        })
    }

    /// The connection, for the other parts that keep state in etcd.
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    #[cfg(test)]
    fn reloads(&self) -> u64 {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reloads
    }

    pub(crate) fn unavailable(&self) -> Option<String> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.broken.as_ref().map(|(why, since)| {
            let since = time::OffsetDateTime::from(*since)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            format!("etcd: {why} (since {since})")
        })
    }

    /// Commits `plan` if the head has not moved since the view's `head_mod`. `Ok(true)`:
    /// committed and in the view; `Ok(false)`: another replica wrote first and the view now
    /// has its write.
    pub(crate) fn commit(&self, plan: &Plan, head_mod: i64, head: u64) -> Result<bool> {
        let k = &self.conn.keys;
        let mut ops = Vec::with_capacity(plan.clusters.len() * 2 + plan.exports.len() + 1);
        for c in &plan.clusters {
            let json = serde_json::to_vec(c).map_err(|e| StoreError::Corrupt {
                key: c.id.clone(),
                reason: e.to_string(),
            })?;
            ops.push(TxnOp::put(k.cluster(&c.id), json, None));
            ops.push(TxnOp::put(
                k.acked(&c.id),
                c.imports_acked_revision.to_string(),
                None,
            ));
        }
        for e in &plan.exports {
            let skey = service_key(&e.export.namespace, &e.export.name);
            ops.push(TxnOp::put(k.export(&e.cluster, &skey), e.encode(), None));
        }
        for (cluster, skey) in &plan.dropped {
            ops.push(TxnOp::delete(k.export(cluster, skey), None));
        }
        if let Some(f) = plan.floor {
            ops.push(TxnOp::put(k.floor(), f.to_string(), None));
        }
        ops.push(TxnOp::put(
            k.head(),
            plan.head.unwrap_or(head).to_string(),
            None,
        ));
        let txn = Txn::new()
            .when([Compare::mod_revision(k.head(), CompareOp::Equal, head_mod)])
            .and_then(ops)
            .or_else([TxnOp::get(k.head(), None)]);
        let resp = self.conn.call("commit", move |mut kv| {
            Box::pin(async move { kv.txn(txn).await })
        })?;
        let timeout = self.conn.timeout;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            if !self.applied.wait(rev, timeout) {
                // Committed (and so acknowledged), but this replica's view lags: the next write
                // will lose its compare and wait again.
                tracing::warn!(
                    revision = rev,
                    "etcd: a committed write has not reached this replica's view yet"
                );
            }
            return Ok(true);
        }
        let winner = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            })
            .unwrap_or(rev);
        if !self.applied.wait(winner, timeout) {
            return Err(StoreError::Etcd {
                what: "commit".into(),
                message: format!(
                    "another replica wrote at etcd revision {winner} and this replica's view has not caught up within {timeout:?}"
                ),
            });
        }
        Ok(false)
    }

    /// Stores a cluster's acknowledged import revision (no compare: see the module doc).
    pub(crate) fn set_acked(&self, id: &str, revision: u64) -> Result<()> {
        let key = self.conn.keys.acked(id);
        self.conn.call("acknowledged revision", move |mut kv| {
            Box::pin(async move { kv.put(key, revision.to_string(), None).await })
        })?;
        Ok(())
    }
}

/// Heartbeats every replica sees: `live/<cluster>` exists while the replica holding the
/// cluster's stream keeps the key's lease (its TTL is the federation's lease TTL) alive with
/// the cluster's heartbeats; etcd deletes it once the cluster has been silent for a TTL, and
/// every replica's watch sees the deletion. So the stale/fresh verdict comes from etcd's clock,
/// the same on every replica, whichever holds the stream (docs/federation-protocol.md).
pub(crate) fn start_liveness(
    conn: &Arc<Conn>,
    ttl: Duration,
) -> tokio::sync::mpsc::UnboundedSender<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let conn2 = conn.clone();
    // etcd counts whole seconds (and enforces its own minimum).
    let secs = i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1);
    conn.handle.spawn(async move {
        let conn = conn2;
        let mut leases: std::collections::HashMap<String, (i64, tokio::time::Instant)> =
            Default::default();
        let every = ttl / 4;
        while let Some(cluster) = rx.recv().await {
            if let Some((id, at)) = leases.get(&cluster).copied() {
                if at.elapsed() < every {
                    continue;
                }
                let kept = async {
                    let (mut keeper, mut stream) =
                        conn.client.lease_client().keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
                };
                match tokio::time::timeout(conn.timeout, kept).await {
                    Ok(Ok(Some(t))) if t > 0 => {
                        leases.insert(cluster, (id, tokio::time::Instant::now()));
                        continue;
                    }
                    // Expired (a TTL passed without a heartbeat) or etcd unreachable: a new
                    // lease below.
                    _ => {
                        leases.remove(&cluster);
                    }
                }
            }
            let key = conn.keys.live(&cluster);
            let granted = async {
                let id = conn.client.lease_client().grant(secs, None).await?.id();
                conn.kv
                    .clone()
                    .put(key, "", Some(etcd_client::PutOptions::new().with_lease(id)))
                    .await?;
                Ok::<_, etcd_client::Error>(id)
            };
            match tokio::time::timeout(conn.timeout, granted).await {
                Ok(Ok(id)) => {
                    leases.insert(cluster, (id, tokio::time::Instant::now()));
                }
                Ok(Err(e)) => {
                    tracing::debug!(%cluster, error = %e, "etcd: cannot record a heartbeat")
                }
                Err(_) => tracing::debug!(%cluster, "etcd: recording a heartbeat timed out"),
            }
        }
    });
    tx
}

/// Small records of one part of meshfed kept under `<prefix>/<part>/<id>` (join tokens, the
/// federation CA, replica addresses), each written with a compare on its revision so that
/// two replicas never both succeed in changing the same record (a join token is spent once).
#[derive(Debug, Clone)]
pub struct Records {
    conn: Arc<Conn>,
    part: String,
}

impl Records {
    /// The records of `part` on `conn`.
    pub fn new(conn: Arc<Conn>, part: &str) -> Self {
        Records {
            conn,
            part: part.to_string(),
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}/{id}", self.conn.keys.other(&self.part))
    }

    /// The record and its revision (what [`swap`](Self::swap) compares).
    pub fn get(&self, id: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let key = self.key(id);
        let resp = self.conn.call("read", move |mut kv| {
            Box::pin(async move { kv.get(key, None).await })
        })?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every record of the part: (id, value).
    pub fn list(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = format!("{}/", self.conn.keys.other(&self.part));
        let p2 = prefix.clone();
        let resp = self.conn.call("list", move |mut kv| {
            Box::pin(async move { kv.get(p2, Some(GetOptions::new().with_prefix())).await })
        })?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let id = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
                Some((id.to_string(), kv.value().to_vec()))
            })
            .collect())
    }

    /// Writes the record whatever it held.
    pub fn put(&self, id: &str, value: Vec<u8>) -> Result<()> {
        let key = self.key(id);
        self.conn.call("write", move |mut kv| {
            Box::pin(async move { kv.put(key, value, None).await })
        })?;
        Ok(())
    }

    /// Writes the record if its revision is still `expected` (0: only if it does not exist):
    /// its new revision, or `None` when another writer changed it first.
    pub fn swap(&self, id: &str, value: Vec<u8>, expected: i64) -> Result<Option<i64>> {
        let key = self.key(id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self.conn.call("write", move |mut kv| {
            Box::pin(async move { kv.txn(txn).await })
        })?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }
}

/// Runs `fut` on the etcd runtime and waits for it (from any thread).
pub(crate) fn run<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StoreError::Etcd {
        what: "client".into(),
        message: "the etcd client's runtime has stopped".into(),
    })
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions> {
    // Keep-alive pings notice a partitioned etcd within seconds, so the watch reconnects and
    // the replica reports it.
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &cfg.tls {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| StoreError::Etcd {
                what: format!("{what} {}", p.display()),
                message: e.to_string(),
            })
        };
        let ca = read("etcd CA", &tls.ca)?;
        let cert = read("etcd client certificate", &tls.cert)?;
        let key = read("etcd client key", &tls.key)?;
        opts = opts.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        );
    }
    Ok(opts)
}

/// Reads every key under the prefix at one etcd revision, a page at a time.
async fn load(kv: &mut KvClient, keys: &Keys) -> Result<(Mem, i64)> {
    let start = keys.all().into_bytes();
    let end = prefix_end(&start);
    let mut from = start;
    let mut rev = 0;
    let mut mem = Mem::default();
    let mut acked = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let resp = kv
            .get(from.clone(), Some(opts))
            .await
            .map_err(|e| etcd_err("load", e))?;
        if rev == 0 {
            rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            acked.extend(apply_put(&mut mem, keys, kv)?);
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    for (id, v) in acked {
        if let Some(c) = mem.clusters.get_mut(&id) {
            c.imports_acked_revision = v;
        }
    }
    Ok((mem, rev))
}

struct Follow {
    watch: WatchClient,
    kv: KvClient,
    keys: Keys,
    mem: Arc<RwLock<Mem>>,
    version: tokio::sync::watch::Sender<Version>,
    applied: Arc<Applied>,
    health: Arc<Mutex<Health>>,
    /// The etcd revision the view has applied.
    rev: i64,
    timeout: Duration,
}

impl Follow {
    fn broken(&self, why: String) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.broken.is_none() {
            tracing::warn!(reason = %why, "etcd: this replica's view stopped following the store");
            h.broken = Some((why, std::time::SystemTime::now()));
        } else if let Some(b) = h.broken.as_mut() {
            b.0 = why;
        }
        drop(h);
        self.version
            .send_if_modified(|v| std::mem::replace(&mut v.following, false));
    }

    fn healthy(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.broken.take().is_some() {
            tracing::info!("etcd: this replica's view follows the store again");
        }
        drop(h);
        self.version
            .send_if_modified(|v| !std::mem::replace(&mut v.following, true));
    }

    fn publish(&self) {
        let m = self.mem.read().unwrap_or_else(|p| p.into_inner());
        let (head, clusters) = (m.head, m.cluster_changes);
        drop(m);
        self.version.send_if_modified(|old| {
            let changed = old.head != head || old.clusters != clusters;
            old.head = head;
            old.clusters = clusters;
            changed
        });
        self.applied.set(self.rev);
    }

    /// Reloads the whole view (the watch's revision was compacted away).
    async fn reload(&mut self) -> Result<()> {
        let (m, rev) = tokio::time::timeout(self.timeout * 4, load(&mut self.kv, &self.keys))
            .await
            .map_err(|_| timed_out("reload", self.timeout * 4))??;
        let changes = {
            let old = self.mem.read().unwrap_or_else(|p| p.into_inner());
            old.cluster_changes
        };
        let mut m = m;
        m.cluster_changes += changes + 1;
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = m;
        self.rev = rev;
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reloads += 1;
        self.publish();
        Ok(())
    }
}

/// Follows the prefix: the only writer of the view.
async fn follow(mut f: Follow) {
    let mut backoff = Duration::from_millis(100);
    // A watch that breaks once (its etcd member went away) is re-established at once on
    // another member before the replica calls itself cut off: losing one member of three
    // must not end every stream of the replicas that watched through it.
    let mut retried = false;
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(f.rev + 1);
        let lost = match f.watch.watch(f.keys.all(), Some(opts)).await {
            Err(e) => format!("cannot watch: {e}"),
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            tracing::info!(
                                from = f.rev + 1,
                                compacted = resp.compact_revision(),
                                "etcd: the watch's revision was compacted; reloading the view"
                            );
                            match f.reload().await {
                                Ok(()) => {
                                    retried = true;
                                    break String::new();
                                }
                                Err(e) => break format!("cannot reload: {e}"),
                            }
                        }
                        if resp.canceled() {
                            break format!("watch canceled: {}", resp.cancel_reason());
                        }
                        backoff = Duration::from_millis(100);
                        retried = false;
                        f.healthy();
                        if resp.events().is_empty() {
                            continue;
                        }
                        {
                            let mut m = f.mem.write().unwrap_or_else(|p| p.into_inner());
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                f.rev = f.rev.max(kv.mod_revision());
                                if ev.event_type() != EventType::Put {
                                    apply_delete(&mut m, &f.keys, kv);
                                    continue;
                                }
                                if let Err(e) = apply_put(&mut m, &f.keys, kv) {
                                    tracing::error!(error = %e, "etcd: a record under the prefix cannot be read; it is skipped")
                                }
                            }
                        }
                        f.publish();
                    }
                    Ok(None) => break "the watch ended".to_string(),
                    Err(e) => break format!("watch: {e}"),
                }
            },
        };
        if !retried {
            retried = true;
            if !lost.is_empty() {
                tracing::info!(reason = %lost, "etcd: the watch broke; watching again");
            }
            continue;
        }
        if !lost.is_empty() {
            f.broken(lost);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

pub mod local;

#[cfg(test)]
mod tests {
    use super::local::LocalEtcd;
    use super::*;
    use crate::{Cursor, Store};
    use proto::{ExportDelta, ServiceExport};

    #[test]
    fn keys_are_parsed_back() {
        let k = Keys::new("/meshfed/");
        assert!(matches!(k.parse(k.head().as_bytes()), Key::Head));
        assert!(matches!(k.parse(k.schema().as_bytes()), Key::Schema));
        assert!(matches!(k.parse(k.cluster("c1").as_bytes()), Key::Cluster));
        assert!(matches!(
            k.parse(k.acked("c1").as_bytes()),
            Key::Acked("c1")
        ));
        assert!(matches!(
            k.parse(k.export("c1", "shop/payment").as_bytes()),
            Key::Export("c1", "shop/payment")
        ));
        assert!(matches!(k.parse(b"/meshfed/tokens/x"), Key::Other));
        assert!(matches!(k.parse(b"/other/meta/head"), Key::Other));
        assert!(matches!(k.parse(b"\xff"), Key::Other));
        assert_eq!(prefix_end(b"/m/"), b"/m0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    use crate::tests::record as member;

    fn member_record(id: &str) -> ClusterRecord {
        member(id)
    }

    fn services(version: u64, names: &[String]) -> ExportDelta {
        ExportDelta {
            version,
            full: false,
            upserts: names
                .iter()
                .map(|n| ServiceExport {
                    namespace: "shop".into(),
                    name: n.clone(),
                    ..Default::default()
                })
                .collect(),
            removals: vec![],
        }
    }

    /// Waits (on the store's own notifications) until `s` has head `head`.
    fn wait_head(s: &Store, head: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut rx = s.subscribe();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| v.head >= head))
                .await
                .unwrap_or_else(|_| panic!("head {} never reached {head}", s.head()))
                .unwrap();
        });
    }

    /// Tombstones compacted by one replica leave the other's view (its watch sees the deletes)
    /// and its floor rises with them.
    #[test]
    fn a_compaction_reaches_the_other_replicas_view() {
        let e = LocalEtcd::start().unwrap();
        let a = Store::open_etcd(&e.config("/fed")).unwrap();
        let b = Store::open_etcd(&e.config("/fed")).unwrap();
        a.join(member("c1")).unwrap();
        let names: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
        a.apply_exports("c1", &services(1, &names)).unwrap();
        let mut gone = services(2, &[]);
        gone.removals = names[..3]
            .iter()
            .map(|n| proto::ServiceKey {
                namespace: "shop".into(),
                name: n.clone(),
            })
            .collect();
        let rev = a.apply_exports("c1", &gone).unwrap().revision.unwrap();
        wait_head(&b, rev);
        assert_eq!(b.tombstones(), 3);
        assert_eq!(a.compact_tombstones(rev, 100).unwrap(), 3);
        // A later write: once b has it, it has applied everything before it.
        let after = a
            .apply_exports("c1", &services(3, &names[3..]))
            .unwrap()
            .revision;
        let after = after.unwrap_or_else(|| a.head());
        a.set_bundle("c1", "{\"keys\": []}", 2).unwrap();
        wait_head(&b, a.head().max(after));
        assert_eq!((b.tombstones(), b.floor()), (0, rev));
        assert_eq!(b.exports_of("c1").unwrap().len(), 2);
    }

    /// Two replicas write at once: every write lands exactly once at its own revision, each
    /// replica's view follows the other's writes, and the two views end equal.
    #[test]
    fn replicas_serialize_their_writes_and_see_each_others() {
        let e = LocalEtcd::start().unwrap();
        let a = Arc::new(Store::open_etcd(&e.config("/fed")).unwrap());
        let b = Arc::new(Store::open_etcd(&e.config("/fed")).unwrap());
        a.join(member("c1")).unwrap();
        b.join(member("c2")).unwrap();
        wait_head(&a, 2);
        wait_head(&b, 2);
        const N: u64 = 60;
        let writer = |s: Arc<Store>, c: &'static str| {
            std::thread::spawn(move || {
                let mut revs = Vec::new();
                for v in 1..=N {
                    let names = vec![format!("{c}-svc{v}")];
                    let applied = s.apply_exports(c, &services(v, &names)).unwrap();
                    revs.push(applied.revision.unwrap());
                }
                revs
            })
        };
        let ta = writer(a.clone(), "c1");
        let tb = writer(b.clone(), "c2");
        let mut revs = ta.join().unwrap();
        revs.extend(tb.join().unwrap());
        revs.sort();
        revs.dedup();
        assert_eq!(
            revs.len() as u64,
            2 * N,
            "every write has a revision of its own"
        );
        assert_eq!(*revs.last().unwrap(), 2 + 2 * N);
        wait_head(&a, 2 + 2 * N);
        wait_head(&b, 2 + 2 * N);
        for s in [&a, &b] {
            assert_eq!(s.exports_of("c1").unwrap().len() as u64, N);
            assert_eq!(s.exports_of("c2").unwrap().len() as u64, N);
            assert_eq!(s.cluster("c1").unwrap().unwrap().exports_acked_version, N);
        }
        // An importer's feed reads the same on either replica: a cursor from one resumes on
        // the other.
        let (first, cur, _) = a
            .changes_since("c3", &Cursor::AfterRevision(0), 10)
            .unwrap();
        let (rest_b, _, upto_b) = b.changes_since("c3", &cur, 1000).unwrap();
        let (rest_a, _, upto_a) = a.changes_since("c3", &cur, 1000).unwrap();
        assert_eq!(first.len() + rest_b.len(), 2 * N as usize);
        assert_eq!(rest_a.len(), rest_b.len());
        assert_eq!(upto_a, upto_b);
        // A new replica loads the same state.
        let c = Store::open_etcd(&e.config("/fed")).unwrap();
        assert_eq!(c.head(), a.head());
        assert_eq!(c.clusters().unwrap(), a.clusters().unwrap());
        // Another prefix is another federation.
        let other = Store::open_etcd(&e.config("/other")).unwrap();
        assert_eq!(other.head(), 0);
        assert!(other.clusters().unwrap().is_empty());
    }

    /// With etcd gone a write fails (nothing is acknowledged) and the store says why; once
    /// etcd is back, the view follows again and writes succeed.
    #[test]
    fn without_etcd_nothing_is_acknowledged_and_the_store_says_so() {
        let mut e = LocalEtcd::start().unwrap();
        let mut cfg = e.config("/fed");
        cfg.timeout = Duration::from_secs(2);
        let s = Store::open_etcd(&cfg).unwrap();
        s.join(member("c1")).unwrap();
        assert_eq!(s.unavailable(), None);
        e.kill(0);
        let err = s
            .apply_exports("c1", &services(1, &["payment".into()]))
            .unwrap_err();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        assert!(err.to_string().contains("etcd"), "{err}");
        assert!(s.exports_of("c1").unwrap().is_empty());
        // The watch notices the loss (keep-alive) and says so.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut rx = s.subscribe();
        let wait = |rx: &mut tokio::sync::watch::Receiver<Version>, following: bool| {
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    rx.wait_for(|v| v.following == following),
                )
                .await
                .unwrap_or_else(|_| panic!("following never became {following}"))
                .map(|_| ())
                .unwrap();
            })
        };
        wait(&mut rx, false);
        let unavailable = s.unavailable().unwrap();
        assert!(unavailable.starts_with("etcd: "), "{unavailable}");
        e.restart(0).unwrap();
        wait(&mut rx, true);
        assert_eq!(s.unavailable(), None);
        let applied = s
            .apply_exports("c1", &services(1, &["payment".into()]))
            .unwrap();
        assert_eq!(applied.revision, Some(2));
        assert_eq!(s.exports_of("c1").unwrap().len(), 1);
    }

    /// mTLS to etcd (it requires client certificates): a store with the CA and a client
    /// certificate works; trusting another CA, or speaking plain HTTP, is refused as an etcd
    /// that cannot be reached; a missing certificate file is named.
    #[test]
    fn mtls_to_etcd_works_and_a_wrong_ca_or_plain_http_is_refused() {
        let e = LocalEtcd::start_mtls().unwrap();
        let s = Store::open_etcd(&e.config("/fed")).unwrap();
        s.join(member("c1")).unwrap();
        assert_eq!(s.clusters().unwrap().len(), 1);
        let tls = e.tls.clone().unwrap();
        // The server's certificate is checked: trusting the client certificate as the CA fails.
        let mut wrong_ca = e.config("/fed");
        wrong_ca.timeout = Duration::from_secs(2);
        wrong_ca.tls = Some(EtcdTls {
            ca: tls.cert.clone(),
            ..tls.clone()
        });
        let err = Store::open_etcd(&wrong_ca).unwrap_err();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        // Plain HTTP to a TLS member: refused.
        let mut plain = e.config("/fed");
        plain.timeout = Duration::from_secs(2);
        plain.tls = None;
        plain.endpoints = vec![e.endpoints()[0].replace("https://", "http://")];
        let err = Store::open_etcd(&plain).unwrap_err();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        // A missing certificate file is named.
        let mut missing = e.config("/fed");
        missing.tls = Some(EtcdTls {
            cert: "/nonexistent/client.pem".into(),
            ..tls
        });
        let err = Store::open_etcd(&missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/client.pem"), "{err}");
    }

    /// A replica cut off from etcd while the others write, and etcd compacted past what it
    /// had seen: when it reaches etcd again its watch cannot resume (compacted), so it loads
    /// the whole view again and has every write it missed.
    #[test]
    fn a_replica_whose_watch_was_compacted_away_reloads_its_view() {
        let e = LocalEtcd::start().unwrap();
        let member = e.endpoints()[0].trim_start_matches("http://").to_string();
        let relay = super::local::Cuttable::start(&member).unwrap();
        let mut cfg = e.config("/fed");
        cfg.endpoints = vec![format!("http://{}", relay.addr)];
        cfg.timeout = Duration::from_secs(2);
        let behind = Store::open_etcd(&cfg).unwrap();
        let writer = Store::open_etcd(&e.config("/fed")).unwrap();
        writer.join(member_record("c1")).unwrap();
        wait_head(&behind, 1);
        let mut rx = behind.subscribe();
        relay.cut();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| !v.following))
                .await
                .expect("the cut replica notices")
                .map(|_| ())
                .unwrap();
        });
        for v in 1..=5 {
            writer
                .apply_exports("c1", &services(v, &[format!("svc{v}")]))
                .unwrap();
        }
        // Compact everything up to now (etcdctl, from Debian's etcd-client).
        let rev = e.status().unwrap()[0]["Status"]["header"]["revision"]
            .as_i64()
            .unwrap();
        let out = std::process::Command::new("etcdctl")
            .args([
                "--endpoints",
                &e.endpoints()[0],
                "compact",
                &rev.to_string(),
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        relay.heal();
        wait_head(&behind, writer.head());
        let crate::Backend::Etcd(b) = &behind.backend else {
            unreachable!()
        };
        assert_eq!(b.reloads(), 1);
        assert_eq!(behind.exports_of("c1").unwrap().len(), 5);
        assert_eq!(behind.clusters().unwrap(), writer.clusters().unwrap());
    }

    /// etcd's own limits on a transaction are named, with the flag that raises them.
    #[test]
    fn a_write_over_etcds_limits_names_the_flag() {
        let e = LocalEtcd::with_flags(1, &[]).unwrap();
        let s = Store::open_etcd(&e.config("/fed")).unwrap();
        s.join(member("c1")).unwrap();
        let names: Vec<String> = (0..200).map(|i| format!("svc{i}")).collect();
        let err = s.apply_exports("c1", &services(1, &names)).unwrap_err();
        assert!(matches!(err, StoreError::EtcdLimit(_)), "{err}");
        assert!(err.to_string().contains("--max-txn-ops"), "{err}");
        assert!(s.exports_of("c1").unwrap().is_empty());
    }

    /// The descriptor the protoc stand-in serves is what protox compiles from the locked
    /// etcd-client's proto files (`MESHFED_REGENERATE=1` rewrites it).
    #[test]
    fn etcd_descriptor_matches_the_locked_etcd_client() {
        // The locked version, and its source as cargo unpacked it.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"etcd-client\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap();
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo")
            });
        let dir = std::fs::read_dir(cargo_home.join("registry/src"))
            .unwrap()
            .filter_map(|d| d.ok())
            .map(|d| d.path().join(format!("etcd-client-{version}")))
            .find(|d| d.is_dir())
            .unwrap();
        let files = [
            "proto/etcd/api/authpb/auth.proto",
            "proto/etcd/api/etcdserverpb/rpc.proto",
            "proto/etcd/api/mvccpb/kv.proto",
            "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ];
        let fds = protox::Compiler::new([dir.join("proto")])
            .unwrap()
            .include_imports(true)
            .include_source_info(true)
            .open_files(files.map(|f| f.trim_start_matches("proto/")))
            .unwrap()
            .encode_file_descriptor_set();
        let inputs: String = files
            .iter()
            .map(|f| {
                use sha2::Digest;
                let bytes = std::fs::read(dir.join(f)).unwrap();
                format!("{}  {f}\n", hex::encode(sha2::Sha256::digest(bytes)))
            })
            .collect();
        let root = root.join("proto/etcd");
        let fds_path = root.join(format!("etcd-client-{version}.fds"));
        let inputs_path = root.join(format!("etcd-client-{version}.inputs"));
        if std::env::var_os("MESHFED_REGENERATE").is_some() {
            std::fs::write(&fds_path, &fds).unwrap();
            std::fs::write(&inputs_path, &inputs).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&inputs_path).unwrap_or_default(),
            inputs,
            "{} is not etcd-client {version}'s; run MESHFED_REGENERATE=1 cargo test -p meshfed-store etcd_descriptor",
            inputs_path.display()
        );
        assert!(
            std::fs::read(&fds_path).unwrap_or_default() == fds,
            "{} differs from protox's compilation; run MESHFED_REGENERATE=1 cargo test -p meshfed-store etcd_descriptor",
            fds_path.display()
        );
    }
}
