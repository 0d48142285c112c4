//! The mesh file's raw shape: serde structs with plain strings and integers, checked in `validate`.
//!
//! Reading into loose types first keeps the messages about values in our hands; serde here only
//! rejects unknown keys, missing keys and wrong TOML types, and we give those a field path.

use serde::Deserialize;
use serde_path_to_error::Segment;

use super::error::{ConfigError, Location};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawConfig {
    pub node: String,
    pub trust_domain: Option<String>,
    pub capture: Option<RawCapture>,
    pub ca: Option<RawCa>,
    pub datapath: Option<RawDatapath>,
    pub http: Option<RawHttp>,
    pub root_namespace: Option<String>,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub pods: Vec<RawPod>,
    #[serde(default)]
    pub services: Vec<RawService>,
}

/// `[ca]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawCa {
    pub dir: String,
    pub svid_ttl_seconds: Option<i64>,
}

/// `[datapath]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawDatapath {
    pub local_shortcut: Option<bool>,
}

/// `[http]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawHttp {
    pub detect_timeout_ms: Option<i64>,
    pub start_traceparent: Option<bool>,
    pub path_normalization: Option<String>,
}

/// `[capture]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawCapture {
    pub mode: Option<String>,
    #[serde(default)]
    pub exclude_ports: Vec<i64>,
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    pub outbound_port: Option<i64>,
    pub inbound_port: Option<i64>,
    pub tunnel_port: Option<i64>,
    pub original_source: Option<bool>,
}

/// One `[[pods]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: Option<String>,
    pub netns: Option<String>,
    pub cgroup: Option<String>,
    pub uid: Option<String>,
    pub ips: Vec<String>,
    pub mode: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<RawPodPort>,
}

/// One entry of a pod's `ports`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawPodPort {
    pub port: i64,
    pub protocol: String,
}

/// One `[[services]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawService {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<String>,
    pub ports: Vec<RawServicePort>,
    pub endpoints: Vec<String>,
}

/// One entry of a service's `ports`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawServicePort {
    pub port: i64,
    pub target_port: Option<i64>,
    pub protocol: Option<String>,
}

/// Parses `text` as TOML into the raw shape, naming the key path of any structural error.
pub(super) fn read(text: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        location: Location::at(text, e.span().map_or(0, |s| s.start)),
        message: e.message().to_owned(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let location = e.inner().span().map(|s| Location::at(text, s.start));
        let message = e.inner().message();
        let mut segments: Vec<&Segment> = e.path().iter().collect();
        // serde_path_to_error ends the path with the unknown key itself; the message already names it,
        // so the path stops at the table that holds it.
        let unknown_key = message.starts_with("unknown field");
        if unknown_key {
            segments.pop();
        }
        // serde quotes names with backticks; the rest of our messages use double quotes.
        let message = if unknown_key || message.starts_with("missing field") {
            message.replace('`', "\"")
        } else {
            message
                .replace("expected i64", "expected an integer")
                .replace("expected a sequence", "expected an array")
        };
        ConfigError::Invalid { path: field_path(&segments), message, location }
    })
}

/// Renders path segments as `pods[1].ips[0]`.
fn field_path(segments: &[&Segment]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Unknown => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push('?');
            }
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> ConfigError {
        match read(text) {
            Ok(raw) => panic!("expected an error, got {raw:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn reads_minimal_file() {
        let raw = read("node = \"n\"\n").expect("minimal file");
        assert_eq!(raw.node, "n");
        assert!(raw.trust_domain.is_none() && raw.capture.is_none());
        assert!(raw.pods.is_empty() && raw.services.is_empty());
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = error("node = \"n\"\n[capture\n");
        let ConfigError::Syntax { location, .. } = &e else { panic!("not a syntax error: {e:?}") };
        assert_eq!(location.line, 2, "{e}");
        assert!(e.to_string().starts_with("TOML syntax error at line 2, column "), "{e}");
    }

    #[test]
    fn unknown_nested_key_names_its_table() {
        let text = "node = \"n\"\n[[services]]\nname = \"s\"\nnamespace = \"d\"\nvips = []\n\
                    endpoints = []\nports = [{ port = 1, prot = 2 }]\n";
        let e = error(text);
        let ConfigError::Invalid { path, message, location } = &e else { panic!("{e:?}") };
        assert_eq!(path, "services[0].ports[0]");
        assert!(message.starts_with("unknown field \"prot\", expected "), "{message}");
        assert_eq!(location.map(|l| l.line), Some(7));
    }

    #[test]
    fn wrong_type_names_the_element() {
        let e = error(
            "node = \"n\"\n[[pods]]\nname = \"a\"\nnamespace = \"d\"\nservice_account = \"a\"\nips = [1]\n",
        );
        assert!(
            e.to_string().starts_with("pods[0].ips[0]: invalid type: integer `1`, expected a string"),
            "{e}"
        );
    }

    #[test]
    fn missing_top_level_key_has_no_path() {
        let e = error("trust_domain = \"x\"\n");
        assert!(e.to_string().starts_with("missing field \"node\""), "{e}");
    }
}
