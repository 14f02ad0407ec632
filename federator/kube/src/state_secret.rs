//! The cluster's shared state for agent replicas: the cluster identity (`identity/`: the
//! cluster certificate and key, the identity facts, the federation bundle) and the cluster CA
//! (`ca/`), kept in one Kubernetes Secret (as istiod keeps its CA in `cacerts`).
//!
//! - `meshfed join --state-secret NAME`: the replica that joins writes the Secret; every other
//!   replica restores its state directory from it instead of joining (a join token is
//!   single-use, and a second join would replace the cluster's membership).
//! - While the agents run, the leader writes the CA's files again after every change it makes
//!   (a rotation), and followers write what the Secret holds into their CA directory, which
//!   their live CA reloads. The identity is not synchronised after the join: each replica
//!   renews its own cluster certificate.
//!
//! The Secret holds one key, `state.json`: `{"cluster": ..., "files": {path: contents}}` with
//! paths relative to the state directory (Secret keys cannot hold `/`).

use std::collections::BTreeMap;
use std::path::Path;

use trust::files::snapshot;

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};

/// The Secret's one key.
pub const KEY: &str = "state.json";

/// The directories of the state directory the Secret carries.
pub const IDENTITY: &str = "identity";
pub const CA: &str = "ca";

/// What the Secret carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    /// The cluster it belongs to (a Secret of another cluster is refused).
    pub cluster: String,
    /// Path relative to the state directory -> contents.
    pub files: BTreeMap<String, String>,
}

impl SharedState {
    /// Reads `dirs` (of [`IDENTITY`], [`CA`]) from the state directory; lock and temporary
    /// files (names starting with `.`) are not state.
    pub fn read(state_dir: &Path, cluster: &str, dirs: &[&str]) -> anyhow::Result<SharedState> {
        Ok(SharedState {
            cluster: cluster.to_string(),
            files: snapshot::read(state_dir, dirs)?,
        })
    }

    /// Only the files under `dir`.
    pub fn only(&self, dir: &str) -> SharedState {
        let prefix = format!("{dir}/");
        SharedState {
            cluster: self.cluster.clone(),
            files: self
                .files
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix))
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect(),
        }
    }

    /// Writes every file into the state directory (atomically each, keys 0600) and returns how
    /// many differed from what was there. A path that would leave the directory is refused.
    pub fn write(&self, state_dir: &Path) -> anyhow::Result<usize> {
        Ok(snapshot::write(state_dir, &self.files, &[IDENTITY, CA])?)
    }

    fn to_secret(&self, namespace: &str, name: &str) -> anyhow::Result<Secret> {
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "meshfed".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some([(KEY.to_string(), ByteString(serde_json::to_vec(self)?))].into()),
            type_: Some("Opaque".into()),
            ..Default::default()
        })
    }

    fn from_secret(s: &Secret, namespace: &str, name: &str) -> anyhow::Result<SharedState> {
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(KEY))
            .with_context(|| format!("Secret {namespace}/{name} has no key {KEY}"))?;
        let state: SharedState = serde_json::from_slice(&bytes.0)
            .with_context(|| format!("Secret {namespace}/{name}: {KEY} is not meshfed's state"))?;
        for p in state.files.keys() {
            snapshot::safe_join(Path::new("/"), p, &[IDENTITY, CA])
                .with_context(|| format!("Secret {namespace}/{name}: {KEY}"))?;
        }
        Ok(state)
    }
}

/// The Secret, if it exists.
pub async fn fetch(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<SharedState>> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    match api
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read Secret {namespace}/{name}"))?
    {
        Some(s) => Ok(Some(SharedState::from_secret(&s, namespace, name)?)),
        None => Ok(None),
    }
}

/// Creates the Secret; `Ok(false)` when it already exists (another replica wrote it).
pub async fn create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    state: &SharedState,
) -> anyhow::Result<bool> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    match api
        .create(&PostParams::default(), &state.to_secret(namespace, name)?)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot create Secret {namespace}/{name}")),
    }
}

/// Replaces the files under `dir` in the Secret with `state`'s (the rest is kept), with the
/// read `resourceVersion` (a concurrent writer makes it fail and the caller try again).
/// Returns whether anything changed.
pub async fn update_dir(
    client: kube::Client,
    namespace: &str,
    name: &str,
    dir: &str,
    state: &SharedState,
) -> anyhow::Result<bool> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let current = api
        .get(name)
        .await
        .with_context(|| format!("cannot read Secret {namespace}/{name}"))?;
    let mut held = SharedState::from_secret(&current, namespace, name)?;
    if held.cluster != state.cluster {
        bail!(
            "Secret {namespace}/{name} holds the state of cluster {:?}, not {:?}",
            held.cluster,
            state.cluster
        );
    }
    let prefix = format!("{dir}/");
    let before = held.files.clone();
    held.files.retain(|p, _| !p.starts_with(&prefix));
    held.files.extend(
        state
            .files
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(p, c)| (p.clone(), c.clone())),
    );
    if held.files == before {
        return Ok(false);
    }
    let mut new = held.to_secret(namespace, name)?;
    new.metadata = ObjectMeta {
        resource_version: current.metadata.resource_version.clone(),
        ..new.metadata
    };
    api.replace(name, &PostParams::default(), &new)
        .await
        .with_context(|| format!("cannot update Secret {namespace}/{name}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_round_trips_with_key_modes_and_without_lock_files() {
        use std::os::unix::fs::PermissionsExt;
        let from = std::env::temp_dir().join(format!("meshfed-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&from);
        std::fs::create_dir_all(from.join("ca/generations/0")).unwrap();
        std::fs::create_dir_all(from.join("identity")).unwrap();
        std::fs::create_dir_all(from.join("cache")).unwrap();
        std::fs::write(from.join("ca/ca-key.pem"), "KEY").unwrap();
        std::fs::write(from.join("ca/generations/0/ca-cert.pem"), "CERT").unwrap();
        std::fs::write(from.join("ca/.lock"), "").unwrap();
        std::fs::write(from.join("identity/identity.json"), "{}").unwrap();
        std::fs::write(from.join("cache/db"), "not state").unwrap();
        let s = SharedState::read(&from, "east", &[IDENTITY, CA]).unwrap();
        assert_eq!(
            s.files.keys().collect::<Vec<_>>(),
            [
                "ca/ca-key.pem",
                "ca/generations/0/ca-cert.pem",
                "identity/identity.json"
            ]
        );
        assert_eq!(s.only(CA).files.len(), 2);
        let secret = s
            .to_secret("meshfed-system", "meshfed-agent-state")
            .unwrap();
        let back = SharedState::from_secret(&secret, "meshfed-system", "x").unwrap();
        assert_eq!(back, s);
        let to = from.with_extension("restored");
        let _ = std::fs::remove_dir_all(&to);
        assert_eq!(back.write(&to).unwrap(), 3);
        assert_eq!(
            back.write(&to).unwrap(),
            0,
            "nothing differs the second time"
        );
        let mode = std::fs::metadata(to.join("ca/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&from);
        let _ = std::fs::remove_dir_all(&to);
    }

    #[test]
    fn paths_that_leave_the_state_directory_are_refused() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "cache/db",
            "ca",
            "ca/../../x",
            "",
            "ca/.lock",
        ] {
            let s = SharedState {
                cluster: "east".into(),
                files: [(bad.to_string(), "x".to_string())].into(),
            };
            let secret = s.to_secret("ns", "n").unwrap();
            let e = SharedState::from_secret(&secret, "ns", "n").unwrap_err();
            assert!(format!("{e:#}").contains("Secret ns/n"), "{bad}: {e:#}");
        }
    }
}
