//! The CustomResourceDefinitions meshfed reads and writes, generated from the Rust types that
//! parse them (schemars, made structural by kube's rewriter): meshfed's `FailoverPolicy`
//! (meshfed.io/v1alpha1, the policy compiler's own spec type) and the MCS `ServiceExport` and
//! `ServiceImport` (multicluster.x-k8s.io/v1alpha1, for clusters that do not have them from
//! kubernetes-sigs/mcs-api). `meshfed crds` prints them; `deploy/kubernetes/crds/` holds them
//! and `federator/tests/deploy.rs` fails when the files drift from the types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceSubresources, CustomResourceValidation,
    JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde_json::{json, Value};

use crate::types::{ServiceExportStatus, ServiceImportSpec, ServiceImportStatus};

/// A Kubernetes structural schema for `T`: inlined, no `$schema`/`title`, no
/// `additionalProperties: false` (forbidden in structural schemas; unknown fields are pruned
/// by the API server instead).
fn schema_of<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .with_transform(kube_core::schema::OptionalEnum)
        .into_generator();
    let mut v = generator.into_root_schema_for::<T>().to_value();
    clean(&mut v);
    v
}

/// Cleans one schema node and the schemas below it; the keys of a `properties` map are field
/// names, not keywords, so a field named `title` stays.
fn clean(v: &mut Value) {
    let Value::Object(m) = v else { return };
    if m.get("additionalProperties") == Some(&Value::Bool(false)) {
        m.remove("additionalProperties");
    }
    for k in ["$schema", "title", "definitions", "$defs"] {
        m.remove(k);
    }
    for (k, x) in m.iter_mut() {
        match (k.as_str(), x) {
            ("properties", Value::Object(fields)) => fields.values_mut().for_each(clean),
            (_, Value::Array(a)) => a.iter_mut().for_each(clean),
            (_, x @ Value::Object(_)) => clean(x),
            _ => {}
        }
    }
}

struct Crd {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    description: &'static str,
    /// The properties beside apiVersion, kind and metadata (spec, status).
    properties: Value,
    required: &'static [&'static str],
    status: bool,
}

fn crd(c: Crd) -> anyhow::Result<CustomResourceDefinition> {
    let mut props = json!({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    });
    if let (Some(p), Some(extra)) = (props.as_object_mut(), c.properties.as_object()) {
        p.extend(extra.clone());
    }
    let mut schema = json!({
        "type": "object",
        "description": c.description,
        "properties": props,
    });
    if !c.required.is_empty() {
        schema["required"] = json!(c.required);
    }
    let schema: JSONSchemaProps = serde_json::from_value(schema)?;
    Ok(CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}", c.plural, c.group)),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: c.group.into(),
            names: CustomResourceDefinitionNames {
                kind: c.kind.into(),
                plural: c.plural.into(),
                singular: Some(c.kind.to_lowercase()),
                short_names: (!c.short.is_empty())
                    .then(|| c.short.iter().map(|s| s.to_string()).collect()),
                list_kind: Some(format!("{}List", c.kind)),
                ..Default::default()
            },
            scope: "Namespaced".into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: c.version.into(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(schema),
                }),
                subresources: c.status.then(|| CustomResourceSubresources {
                    status: Some(Default::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    })
}

/// meshfed's FailoverPolicy, its spec the policy compiler's own type.
pub fn failover_policy() -> anyhow::Result<CustomResourceDefinition> {
    crd(Crd {
        group: "meshfed.io",
        version: "v1alpha1",
        kind: "FailoverPolicy",
        plural: "failoverpolicies",
        short: &["fp"],
        description: "How this cluster's proxies order and weigh the endpoints of one host across localities, networks and clusters (docs/failover.md).",
        properties: json!({
            "spec": schema_of::<meshfed_model::policy::spec::FailoverPolicySpec>(),
        }),
        required: &["spec"],
        status: false,
    })
}

/// The MCS ServiceExport and ServiceImport (KEP-1645, v1alpha1).
pub fn mcs() -> anyhow::Result<Vec<CustomResourceDefinition>> {
    Ok(vec![
        crd(Crd {
            group: "multicluster.x-k8s.io",
            version: "v1alpha1",
            kind: "ServiceExport",
            plural: "serviceexports",
            short: &["svcex"],
            description: "Exports the Service of the same namespace and name to the clusterset (KEP-1645).",
            properties: json!({"status": schema_of::<ServiceExportStatus>()}),
            required: &[],
            status: true,
        })?,
        crd(Crd {
            group: "multicluster.x-k8s.io",
            version: "v1alpha1",
            kind: "ServiceImport",
            plural: "serviceimports",
            short: &["svcim"],
            description: "A service exported by clusters of the clusterset, as this cluster can reach it (KEP-1645).",
            properties: json!({
                "spec": schema_of::<ServiceImportSpec>(),
                "status": schema_of::<ServiceImportStatus>(),
            }),
            required: &[],
            status: true,
        })?,
    ])
}

/// CRDs as one YAML stream (`---` between documents).
pub fn to_yaml(crds: &[CustomResourceDefinition]) -> anyhow::Result<String> {
    let mut out = String::new();
    for c in crds {
        let mut v = serde_json::to_value(c)?;
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), json!("apiextensions.k8s.io/v1"));
            m.insert("kind".into(), json!("CustomResourceDefinition"));
        }
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&v)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The rules of a structural schema the generated ones could break: every node typed (or
    /// int-or-string / preserve-unknown-fields), no `$ref`, no `additionalProperties: false`,
    /// `additionalProperties` not beside `properties`.
    fn check(v: &Value, path: &str) {
        let m = v
            .as_object()
            .unwrap_or_else(|| panic!("{path}: not a schema"));
        assert!(!m.contains_key("$ref"), "{path}: $ref");
        assert_ne!(
            m.get("additionalProperties"),
            Some(&Value::Bool(false)),
            "{path}"
        );
        assert!(
            !(m.contains_key("properties") && m.contains_key("additionalProperties")),
            "{path}: properties and additionalProperties"
        );
        assert!(
            m.contains_key("type")
                || m.contains_key("x-kubernetes-int-or-string")
                || m.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path}: no type in {m:?}"
        );
        if let Some(Value::Object(props)) = m.get("properties") {
            for (k, x) in props {
                check(x, &format!("{path}.{k}"));
            }
        }
        if let Some(x) = m.get("items") {
            check(x, &format!("{path}[]"));
        }
        if let Some(x @ Value::Object(_)) = m.get("additionalProperties") {
            check(x, &format!("{path}{{}}"));
        }
    }

    /// A field named like a keyword stays; the keyword goes.
    #[test]
    fn cleaning_removes_keywords_not_fields() {
        let mut v = json!({"title": "T", "type": "object", "additionalProperties": false,
            "properties": {"title": {"type": "string", "title": "x"}}});
        clean(&mut v);
        assert_eq!(
            v,
            json!({"type": "object", "properties": {"title": {"type": "string"}}})
        );
    }

    #[test]
    fn schemas_are_structural() {
        let mut all = vec![failover_policy().unwrap()];
        all.extend(mcs().unwrap());
        for c in &all {
            let v = serde_json::to_value(&c.spec.versions[0].schema).unwrap();
            check(&v["openAPIV3Schema"], &c.spec.names.kind);
        }
    }

    /// The FailoverPolicy schema has the fields the compiler reads, named as in YAML.
    #[test]
    fn failover_policy_schema_names_the_compilers_fields() {
        let c = failover_policy().unwrap();
        let v = serde_json::to_value(&c.spec.versions[0].schema).unwrap();
        let spec = &v["openAPIV3Schema"]["properties"]["spec"];
        let props: Vec<&String> = spec["properties"].as_object().unwrap().keys().collect();
        for f in [
            "host",
            "failoverPriority",
            "failover",
            "distribute",
            "outlierDetection",
            "staleness",
            "allowWithoutHealthSignal",
            "publish",
        ] {
            assert!(props.iter().any(|p| *p == f), "{f} missing from {props:?}");
        }
        assert_eq!(spec["required"], json!(["host"]));
        assert_eq!(
            spec["properties"]["staleness"]["properties"]["onExpiry"]["enum"],
            json!(["deprioritize", "withdraw"])
        );
        assert_eq!(
            spec["properties"]["distribute"]["items"]["properties"]["to"]["additionalProperties"]
                ["type"],
            json!("integer")
        );
    }
}
