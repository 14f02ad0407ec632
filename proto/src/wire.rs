//! What the federator sends on a Sync stream, as it puts it on the wire: the same bytes as
//! `FederatorMessage`, with each imported service's export carried as the encoded
//! `ServiceExport` the store already holds. A message field and a bytes field are both
//! length-delimited with the same tag, so a client decodes these as `FederatorMessage` (tests
//! below, field by field against the .proto). The federator then neither decodes a stored
//! export nor encodes it again for each of its importers: the stored bytes are shared.

use crate::federation as pb;

#[derive(Clone, PartialEq, prost::Message)]
pub struct FederatorMessageWire {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<Kind>,
}

/// `FederatorMessage.kind`, with imports as [`ImportDeltaWire`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(message, tag = "1")]
    Welcome(pb::Welcome),
    #[prost(message, tag = "2")]
    ExportAck(pb::ExportAck),
    #[prost(message, tag = "3")]
    Imports(ImportDeltaWire),
    #[prost(message, tag = "4")]
    Peers(pb::PeerStates),
    #[prost(message, tag = "5")]
    FederationBundle(pb::FederationBundle),
    #[prost(message, tag = "6")]
    Endpoints(pb::FederatorEndpoints),
}

/// `ImportDelta`, with upserts as [`ImportedServiceWire`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImportDeltaWire {
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    #[prost(bool, tag = "2")]
    pub full: bool,
    #[prost(message, repeated, tag = "3")]
    pub upserts: Vec<ImportedServiceWire>,
    #[prost(message, repeated, tag = "4")]
    pub removals: Vec<pb::ImportKey>,
    #[prost(message, repeated, tag = "5")]
    pub bundles: Vec<pb::PeerBundle>,
    #[prost(string, repeated, tag = "6")]
    pub bundle_removals: Vec<String>,
}

/// `ImportedService`, its `export` the encoded `ServiceExport`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImportedServiceWire {
    #[prost(string, tag = "1")]
    pub source_cluster: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub export: bytes::Bytes,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    /// Every field of the messages these twins stand for, as the .proto defines them: a field
    /// added there must be added here (this test names it).
    #[test]
    fn the_twins_have_every_field_of_the_proto_messages() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        let fds = protox::compile(
            [format!("{root}/meshfed/federation/v1/federation.proto")],
            [root],
        )
        .unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.name().ends_with("federation/v1/federation.proto"))
            .unwrap();
        let fields = |msg: &str| -> Vec<(i32, String)> {
            let m = file
                .message_type
                .iter()
                .find(|m| m.name() == msg)
                .unwrap_or_else(|| panic!("{msg} not in the proto"));
            m.field
                .iter()
                .map(|f| (f.number(), f.name().to_string()))
                .collect()
        };
        let owned = |v: &[(i32, &str)]| -> Vec<(i32, String)> {
            v.iter().map(|(n, s)| (*n, s.to_string())).collect()
        };
        assert_eq!(
            fields("FederatorMessage"),
            owned(&[
                (1, "welcome"),
                (2, "export_ack"),
                (3, "imports"),
                (4, "peers"),
                (5, "federation_bundle"),
                (6, "endpoints"),
            ]),
            "FederatorMessage changed: mirror it in proto::wire::Kind"
        );
        assert_eq!(
            fields("ImportDelta"),
            owned(&[
                (1, "revision"),
                (2, "full"),
                (3, "upserts"),
                (4, "removals"),
                (5, "bundles"),
                (6, "bundle_removals"),
            ]),
            "ImportDelta changed: mirror it in proto::wire::ImportDeltaWire"
        );
        assert_eq!(
            fields("ImportedService"),
            owned(&[(1, "source_cluster"), (2, "export")]),
            "ImportedService changed: mirror it in proto::wire::ImportedServiceWire"
        );
    }

    /// An import delta with every field set, encoded as the twin, decodes as the generated
    /// message with the same content.
    #[test]
    fn a_client_decodes_the_twin_as_the_message() {
        let export = pb::ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            ports: vec![pb::Port {
                name: "http".into(),
                port: 8080,
                protocol: "TCP".into(),
                app_protocol: "http".into(),
            }],
            endpoints: vec![pb::Endpoint {
                address: "10.0.0.1".into(),
                weight: 3,
                healthy: true,
                labels: [("version".to_string(), "v1".to_string())].into(),
                ..Default::default()
            }],
            export_to: vec!["west".into()],
            ..Default::default()
        };
        let removal = pb::ImportKey {
            source_cluster: "east".into(),
            namespace: "shop".into(),
            name: "ledger".into(),
        };
        let bundle = pb::PeerBundle {
            trust_domain: "east.mesh".into(),
            source_cluster: "east".into(),
            bundle_json: "{\"keys\":[]}".into(),
        };
        let wire = FederatorMessageWire {
            kind: Some(Kind::Imports(ImportDeltaWire {
                revision: 42,
                full: true,
                upserts: vec![ImportedServiceWire {
                    source_cluster: "east".into(),
                    export: export.encode_to_vec().into(),
                }],
                removals: vec![removal.clone()],
                bundles: vec![bundle.clone()],
                bundle_removals: vec!["old.mesh".into()],
            })),
        };
        let expected = pb::FederatorMessage {
            kind: Some(pb::federator_message::Kind::Imports(pb::ImportDelta {
                revision: 42,
                full: true,
                upserts: vec![pb::ImportedService {
                    source_cluster: "east".into(),
                    export: Some(export),
                }],
                removals: vec![removal],
                bundles: vec![bundle],
                bundle_removals: vec!["old.mesh".into()],
            })),
        };
        let bytes = wire.encode_to_vec();
        assert_eq!(
            pb::FederatorMessage::decode(bytes.as_slice()).unwrap(),
            expected
        );
        assert_eq!(
            bytes,
            expected.encode_to_vec(),
            "the same bytes on the wire"
        );
        // The other kinds are the generated messages themselves.
        for (w, m) in [
            (
                Kind::Endpoints(pb::FederatorEndpoints {
                    addresses: vec!["a:1".into()],
                }),
                pb::federator_message::Kind::Endpoints(pb::FederatorEndpoints {
                    addresses: vec!["a:1".into()],
                }),
            ),
            (
                Kind::Welcome(pb::Welcome {
                    exports_acked_version: 7,
                    lease_ttl_ms: 30_000,
                    heartbeat_interval_ms: 10_000,
                }),
                pb::federator_message::Kind::Welcome(pb::Welcome {
                    exports_acked_version: 7,
                    lease_ttl_ms: 30_000,
                    heartbeat_interval_ms: 10_000,
                }),
            ),
        ] {
            let bytes = FederatorMessageWire { kind: Some(w) }.encode_to_vec();
            assert_eq!(
                pb::FederatorMessage::decode(bytes.as_slice()).unwrap(),
                pb::FederatorMessage { kind: Some(m) }
            );
        }
    }
}
