//! The one error type of the mesh file: every message names what was wrong and where.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a mesh file was rejected; its Display is the whole message shown to the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid TOML.
    #[error("TOML syntax error at {location}: {message}")]
    Syntax {
        /// Where the parser stopped.
        location: Location,
        /// The parser's description of the problem.
        message: String,
    },
    /// A value is missing, unknown, of the wrong type or breaks a rule of the mesh model.
    #[error("{}{message}{}", prefix(path), suffix(location))]
    Invalid {
        /// The field path, such as `pods[1].ips[0]`; empty for the top-level table.
        path: String,
        /// What is wrong with the value, naming the value.
        message: String,
        /// Where in the text, when the TOML reader knows it.
        location: Option<Location>,
    },
    /// The mesh file could not be read.
    #[error("cannot read {}: {message}", path.display())]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// The I/O error's kind, so callers can tell a missing file apart.
        kind: io::ErrorKind,
        /// The I/O error's description.
        message: String,
    },
    /// An error in the content of the file at `path`.
    // `cause` is deliberately not a `source`: the message already includes it, and error chains
    // would print it twice.
    #[error("{}: {cause}", path.display())]
    File {
        /// The file that was read.
        path: PathBuf,
        /// What was wrong with its content.
        cause: Box<ConfigError>,
    },
}

impl ConfigError {
    /// An error in the value at `path`, which the message names.
    pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.into(), message: message.into(), location: None }
    }
}

fn prefix(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!("{path}: ") }
}

fn suffix(location: &Option<Location>) -> String {
    location.map(|l| format!(" (at {l})")).unwrap_or_default()
}

/// A one-based line and column (in characters) in the mesh file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The line, counting from 1.
    pub line: usize,
    /// The column in characters, counting from 1.
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text` (clamped to the text's end).
    pub(super) fn at(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(Location::at(text, 0), Location { line: 1, column: 1 });
        // The byte offset of '=' on line 2 is 10 ("a = 1\n" + "bé "), its column is 4.
        assert_eq!(Location::at(text, 10), Location { line: 2, column: 4 });
        assert_eq!(Location::at(text, 999), Location { line: 3, column: 1 });
        // An offset inside a multi-byte character falls back to its start.
        assert_eq!(Location::at(text, 8), Location { line: 2, column: 2 });
    }

    #[test]
    fn display_names_path_message_and_location() {
        let err = ConfigError::Invalid {
            path: "pods[0]".into(),
            message: "unknown field \"ipz\"".into(),
            location: Some(Location { line: 4, column: 1 }),
        };
        assert_eq!(err.to_string(), "pods[0]: unknown field \"ipz\" (at line 4, column 1)");
        let top = ConfigError::invalid("", "missing field \"node\"");
        assert_eq!(top.to_string(), "missing field \"node\"");
        let file = ConfigError::File { path: "/etc/mesh.toml".into(), cause: Box::new(top) };
        assert_eq!(file.to_string(), "/etc/mesh.toml: missing field \"node\"");
    }
}
