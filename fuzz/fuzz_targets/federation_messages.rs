//! Federation messages come from other processes (a cluster's Sync stream, the federator's
//! import deltas): decoding and validating any bytes must never panic, and what validation
//! accepts re-encodes to a message that decodes and validates the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshfed_model::validate::{check_export, check_facts};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = proto::ClusterMessage::decode(data) {
        match &m.kind {
            Some(proto::cluster_message::Kind::Hello(h)) => {
                if let Some(f) = &h.facts {
                    let _ = check_facts(f, "hello.facts");
                }
            }
            Some(proto::cluster_message::Kind::Exports(d)) => {
                for (i, e) in d.upserts.iter().enumerate() {
                    if check_export(e, &format!("upserts[{i}]")).is_ok() {
                        let back = proto::ServiceExport::decode(e.encode_to_vec().as_slice())
                            .expect("an accepted export re-encodes");
                        assert_eq!(&back, e);
                        assert!(check_export(&back, "again").is_ok());
                    }
                }
            }
            _ => {}
        }
    }
    if let Ok(d) = proto::ImportDelta::decode(data) {
        for u in &d.upserts {
            if let Some(e) = &u.export {
                let _ = check_export(e, "imports.upserts[0].export");
            }
        }
    }
});
