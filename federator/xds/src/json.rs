//! Canonical proto3 JSON for the Envoy resources meshfed sends (the form of Envoy's
//! config_dump), from a descriptor set compiled at build time from envoy-types' .proto files.

use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| format!("the Envoy descriptor set is unusable: {e}"))
}

/// `{"@type": ..., fields...}` for an Any holding one of the served resource types.
pub fn any_to_json(any: &Any) -> Result<serde_json::Value, String> {
    let pool = pool()?;
    let name = any
        .type_url
        .rsplit_once('/')
        .map(|(_, n)| n)
        .unwrap_or(&any.type_url);
    let desc = pool
        .get_message_by_name(name)
        .ok_or_else(|| format!("unknown type {}", any.type_url))?;
    let msg = DynamicMessage::decode(desc, any.value.as_slice())
        .map_err(|e| format!("cannot decode {}: {e}", any.type_url))?;
    let opts = SerializeOptions::new().skip_default_fields(true);
    let mut ser = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(&mut ser, &opts)
        .map_err(|e| format!("cannot render {}: {e}", any.type_url))?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&ser.into_inner()).map_err(|e| e.to_string())?;
    if let serde_json::Value::Object(m) = &mut v {
        let mut out = serde_json::Map::new();
        out.insert("@type".into(), any.type_url.clone().into());
        out.append(m);
        v = serde_json::Value::Object(out);
    }
    Ok(v)
}
