//! Machine-readable agent events (JSON lines): enrollment, readiness and one record per connection.
//! Tests and the demo read them; operators can ship them as an access log.

use std::{fs::File, io::Write, path::Path, sync::Mutex};

use serde_json::Value;

/// Where events go; a sink without a file drops them.
#[derive(Debug, Default)]
pub struct EventSink {
    file: Option<Mutex<File>>,
}

impl EventSink {
    /// Appends to `path` (created if missing); `None` disables events.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?)),
            None => None,
        };
        Ok(Self { file })
    }

    /// Whether events are recorded at all (lets hot paths skip building them).
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Writes one event as a single line, in one write so concurrent readers never see half a line.
    pub fn emit(&self, event: Value) {
        if self.file.is_none() {
            return;
        }
        let mut line = event.to_string();
        line.push('\n');
        self.emit_line(&line);
    }

    /// Writes an already serialized event, `line` ending in a newline, in one write: a record bound
    /// for several sinks is serialized once.
    pub fn emit_line(&self, line: &str) {
        let Some(file) = &self.file else { return };
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "writing event failed");
        }
    }
}
