//! The Kubernetes source of the agent (`meshfed agent --source kubernetes`): it watches
//! Services, EndpointSlices, Nodes, Pods and MCS ServiceExports through kube-runtime and
//! publishes the cluster's services as the model wants them ([`view::View`]); the agent's local
//! source writes them into the model, as it does the registry file's.
//!
//! - [`types`]: the MCS ServiceExport and meshfed's annotations on it.
//! - [`view`]: objects -> model, a pure function (problems name `kind namespace/name`).
//! - [`source`]: the client, the watches and reflector stores, the view builder.
//! - [`sink`]: what the agent writes: MCS ServiceImports for what the cluster imports.
//! - [`policies`]: FailoverPolicy objects and opted-in DestinationRules for the policy compiler.
//! - [`crds`]: the CRDs of FailoverPolicy and the MCS types, generated from these types.
//! - [`selector`]: `--namespace-selector`, a label selector in kubectl's string form.
//! - [`leader`]: leader election among the agent's replicas (a coordination.k8s.io Lease).
//! - [`state_secret`]: the cluster identity and CA replicas share, in a Secret.
//! - [`shared_vips`]: the service VIPs a leader shares with its followers (a ConfigMap).
//! - [`istio`]: imported services as Istio ServiceEntries, WorkloadEntries and DestinationRules, and the peers' roots as mesh config, for an istiod in the cluster.
//! - [`token_review`]: who a service-account token belongs to (a TokenReview), for the CA API.
//! - [`rbac`]: the verbs on the resources all this uses (what the deploy ClusterRole grants).

pub mod crds;
pub mod inject;
pub mod istio;
pub mod istio_schema;
pub mod leader;
pub mod policies;
pub mod rbac;
pub mod selector;
pub mod shared_vips;
pub mod sink;
pub mod source;
pub mod state_secret;
pub mod token_review;
pub mod types;
pub mod view;
