//! Istio's `AuthorizationPolicy` as written in YAML (`security.istio.io/v1` and `v1beta1`): the raw
//! shape, field for field, with unknown fields refused so nothing a user wrote is silently ignored.
//! Values are checked and compiled in `compile`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// One YAML document: an `AuthorizationPolicy` (or a `List` of them, as `kubectl get -o yaml` prints).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Document {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Option<Spec>,
    /// `kind: List`: the objects.
    #[serde(default)]
    pub items: Option<Vec<serde_json::Value>>,
    /// Written by the API server; means nothing to a policy's meaning.
    #[serde(default, rename = "status")]
    pub _status: Option<serde_json::Value>,
}

/// The parts of Kubernetes' ObjectMeta a policy uses; the rest (uid, resourceVersion, labels...) is
/// bookkeeping that does not change what the policy means, so it is accepted and ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, Scalar>,
}

/// `spec`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Spec {
    pub selector: Option<Selector>,
    pub target_ref: Option<serde_json::Value>,
    pub target_refs: Option<Vec<serde_json::Value>>,
    pub action: Option<String>,
    pub provider: Option<serde_json::Value>,
    pub rules: Option<Vec<Option<Rule>>>,
}

/// `spec.selector`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, Scalar>,
}

/// One of `spec.rules`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Rule {
    pub from: Option<Vec<Option<From>>>,
    pub to: Option<Vec<Option<To>>>,
    pub when: Option<Vec<Option<Condition>>>,
}

/// One of `rules[].from`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct From {
    pub source: Option<Source>,
}

/// `rules[].from[].source`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Source {
    pub principals: Option<Strings>,
    pub not_principals: Option<Strings>,
    pub request_principals: Option<Strings>,
    pub not_request_principals: Option<Strings>,
    pub namespaces: Option<Strings>,
    pub not_namespaces: Option<Strings>,
    pub service_accounts: Option<Strings>,
    pub not_service_accounts: Option<Strings>,
    pub ip_blocks: Option<Strings>,
    pub not_ip_blocks: Option<Strings>,
    pub remote_ip_blocks: Option<Strings>,
    pub not_remote_ip_blocks: Option<Strings>,
}

/// One of `rules[].to`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct To {
    pub operation: Option<Operation>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Operation {
    pub hosts: Option<Strings>,
    pub not_hosts: Option<Strings>,
    pub ports: Option<Strings>,
    pub not_ports: Option<Strings>,
    pub methods: Option<Strings>,
    pub not_methods: Option<Strings>,
    pub paths: Option<Strings>,
    pub not_paths: Option<Strings>,
}

/// One of `rules[].when`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Condition {
    pub key: Option<String>,
    pub values: Option<Strings>,
    pub not_values: Option<Strings>,
}

/// A list of strings. YAML writes `ports: [8080]` as numbers and `values: [true]` as booleans; Istio's
/// API has strings there, so scalars are taken as their text.
#[derive(Debug, Default, Clone)]
pub(super) struct Strings(pub Vec<String>);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<Scalar>::deserialize(d)?;
        Ok(Strings(items.into_iter().map(|s| s.0).collect()))
    }
}

/// A YAML scalar read as text (a string, number or boolean); maps and lists are refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Scalar(s)),
            serde_json::Value::Number(n) => Ok(Scalar(n.to_string())),
            serde_json::Value::Bool(b) => Ok(Scalar(b.to_string())),
            serde_json::Value::Null => Err(D::Error::custom("expected a string, found null")),
            serde_json::Value::Array(_) => Err(D::Error::custom("expected a string, found a list")),
            serde_json::Value::Object(_) => Err(D::Error::custom("expected a string, found a map")),
        }
    }
}
