//! Reading policy sources: the files and directories the mesh file names, each a multi-document
//! YAML file of Istio `AuthorizationPolicy` objects (or `List`s of them, as kubectl prints).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::compile::{self, Policy};
use super::error::{FieldError, PolicyError};
use super::model::Document;

/// The bytes of every policy file, in load order: what a watcher compares and what is parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// (file, contents), sorted by file within each source.
    pub files: Vec<(PathBuf, Vec<u8>)>,
}

/// Where a policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// The document's position in the file, from 1.
    pub document: usize,
}

/// Largest policy file read; a bigger one is refused rather than parsed.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads every file of `sources` (files, or directories whose `*.yaml`/`*.yml` entries are read,
/// dot-files skipped). A source that cannot be read is an error: a policy must never vanish because
/// its file was briefly unreadable.
pub fn snapshot(sources: &[PathBuf]) -> Result<Snapshot, PolicyError> {
    let mut files = Vec::new();
    for source in sources {
        let read_err = |path: &Path, e: std::io::Error| PolicyError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let meta = std::fs::metadata(source).map_err(|e| read_err(source, e))?;
        let mut paths = if meta.is_dir() {
            let mut paths = Vec::new();
            for entry in std::fs::read_dir(source).map_err(|e| read_err(source, e))? {
                let entry = entry.map_err(|e| read_err(source, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
                let path = entry.path();
                // Kubernetes mounts ConfigMaps as symlinks into a dot-directory: follow them.
                if yaml && !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                    paths.push(path);
                }
            }
            paths.sort();
            paths
        } else {
            vec![source.clone()]
        };
        for path in paths.drain(..) {
            let len = std::fs::metadata(&path).map_err(|e| read_err(&path, e))?.len();
            if len > MAX_FILE_BYTES {
                return Err(PolicyError::Read {
                    path,
                    message: format!(
                        "{len} bytes is more than the {MAX_FILE_BYTES} bytes a policy file may have"
                    ),
                });
            }
            let bytes = std::fs::read(&path).map_err(|e| read_err(&path, e))?;
            files.push((path, bytes));
        }
    }
    Ok(Snapshot { files })
}

/// Parses and compiles every file of `snapshot`; any invalid document rejects the whole set, and so
/// does a `namespace/name` defined twice.
pub fn compile_snapshot(snapshot: &Snapshot) -> Result<Vec<(Policy, Origin)>, PolicyError> {
    let mut out: Vec<(Policy, Origin)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (file, bytes) in &snapshot.files {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| PolicyError::Syntax { file: file.clone(), message: format!("not UTF-8: {e}") })?;
        for (policy, origin) in parse_file(file, text)? {
            let key = policy.key();
            if let Some(&first) = seen.get(&key) {
                let prior = &out[first].1;
                return Err(PolicyError::Invalid {
                    file: origin.file,
                    document: origin.document,
                    policy: Some(key),
                    field: "metadata.name".into(),
                    message: format!(
                        "this policy is already defined in {}, document {}",
                        prior.file.display(),
                        prior.document
                    ),
                });
            }
            seen.insert(key, out.len());
            out.push((policy, origin));
        }
    }
    Ok(out)
}

/// Budgets against hostile YAML (alias bombs, deep nesting): far above any real policy file.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: 64,
            max_anchors: 1_000,
            max_events: 2_000_000,
        },
    }
}

/// Parses the documents of one file's `text` and compiles each policy.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<(Policy, Origin)>, PolicyError> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| PolicyError::Syntax { file: file.to_owned(), message: e.to_string() })?;
    let mut out = Vec::new();
    for (i, value) in docs.into_iter().enumerate() {
        let document = i + 1;
        let invalid = |policy: Option<String>, e: FieldError| PolicyError::Invalid {
            file: file.to_owned(),
            document,
            policy,
            field: e.field,
            message: e.message,
        };
        let name = policy_name(&value);
        if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            let doc: Document = typed(value).map_err(|e| invalid(None, e))?;
            for (j, item) in doc.items.unwrap_or_default().into_iter().enumerate() {
                let name = policy_name(&item);
                let at = |e: FieldError| FieldError::new(join(&format!("items[{j}]"), &e.field), e.message);
                let policy = typed(item).and_then(compile::compile).map_err(|e| invalid(name, at(e)))?;
                out.push((policy, Origin { file: file.to_owned(), document }));
            }
            continue;
        }
        let policy = typed(value).and_then(compile::compile).map_err(|e| invalid(name, e))?;
        out.push((policy, Origin { file: file.to_owned(), document }));
    }
    Ok(out)
}

fn join(prefix: &str, field: &str) -> String {
    if field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{field}") }
}

/// `namespace/name` of a raw document, for messages about it.
fn policy_name(value: &serde_json::Value) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    Some(format!("{ns}/{name}"))
}

/// Reads a raw document into the schema, naming the field of any mismatch.
fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldError> {
    if !value.is_object() {
        return Err(FieldError::new(
            "",
            format!("expected a map (a Kubernetes object), found {}", kind_of(&value)),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = e.inner().to_string().replace('`', "\"");
        // serde's unknown-field message is about the map the path ends in; say what is not supported.
        if !message.starts_with("unknown field") {
            return FieldError::new(path, message);
        }
        // The path ends with the unknown key, which the message names: point at the map holding it.
        let path = match path.rsplit_once('.') {
            Some((map, _)) => map.to_owned(),
            None => String::new(),
        };
        FieldError::new(
            path,
            format!(
                "{message}: Ferry does not know this field, so it refuses the policy rather than ignore it"
            ),
        )
    })
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a map",
    }
}
