//! Why a policy source was rejected: every message names the file, the document, the policy, the
//! field and the value, so an operator can fix it without guessing.

use std::path::PathBuf;

/// A policy source that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory named in the mesh file could not be read.
    #[error("cannot read policy source {}: {message}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error's description.
        message: String,
    },
    /// The file is not valid YAML (or not UTF-8).
    #[error("policy file {}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's description, with its location.
        message: String,
    },
    /// A document breaks Istio's schema or validation rules, or uses what Ferry cannot enforce.
    #[error("policy file {}, document {document}{}: {}{message}", file.display(), named(policy), field_prefix(field))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The document's position in the file, from 1 (empty documents are not counted).
        document: usize,
        /// `namespace/name`, when the document got that far.
        policy: Option<String>,
        /// The field path, such as `spec.rules[0].from[0].source.ipBlocks[1]`.
        field: String,
        /// What is wrong, naming the value.
        message: String,
    },
}

fn named(policy: &Option<String>) -> String {
    policy.as_ref().map(|p| format!(" ({p})")).unwrap_or_default()
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() { String::new() } else { format!("{field}: ") }
}

/// A validation failure inside one document, before the file and document are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FieldError {
    /// The field path.
    pub field: String,
    /// What is wrong, naming the value.
    pub message: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}
