//! A log filter that can change while the agent runs: `POST /log-level` swaps it through a
//! `tracing_subscriber::reload` handle instead of restarting the agent.

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

/// Level names accepted on their own.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Why a log level was refused or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The directive was empty.
    #[error("empty log level: expected one of trace, debug, info, warn, error, off")]
    Empty,
    /// A bare word that is not a level (a typo such as "degub").
    #[error(
        "unknown log level {0:?}: expected one of trace, debug, info, warn, error, off, or \
         directives such as \"info,ferry::proxy=debug\""
    )]
    UnknownLevel(String),
    /// The EnvFilter syntax was wrong.
    #[error("invalid log filter {directive:?}: {message}")]
    Syntax {
        /// The directive given.
        directive: String,
        /// The parser's complaint.
        message: String,
    },
    /// The subscriber holding the filter is gone.
    #[error("the log filter can no longer be changed: {0}")]
    Reload(String),
    /// A global subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Install(String),
}

impl From<LogLevelError> for super::StateError {
    /// Bad input is the caller's (400); a broken subscriber is ours (500).
    fn from(e: LogLevelError) -> Self {
        match e {
            LogLevelError::Reload(_) | LogLevelError::Install(_) => Self::Failed(e.to_string()),
            _ => Self::Invalid(e.to_string()),
        }
    }
}

/// Parses a level (`debug`) or an EnvFilter directive list (`info,ferry::proxy=debug`).
///
/// Stricter than `EnvFilter` itself: a bare word that is not a level is refused, because EnvFilter
/// would read "degub" as a target name and silently log nothing new. To enable every level of a
/// target, write `target=trace`.
pub fn parse_directive(directive: &str) -> Result<EnvFilter, LogLevelError> {
    let directive = directive.trim();
    if directive.is_empty() {
        return Err(LogLevelError::Empty);
    }
    for part in directive.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(LogLevelError::Syntax {
                directive: directive.to_owned(),
                message: "empty directive between commas".to_owned(),
            });
        }
        if !part.contains('=') && !part.contains('[') && !is_level(part) {
            return Err(LogLevelError::UnknownLevel(part.to_owned()));
        }
    }
    // Regexes in field filters are off: a filter should never be able to cost the agent CPU.
    EnvFilter::builder()
        .with_regex(false)
        .parse(directive)
        .map_err(|e| LogLevelError::Syntax { directive: directive.to_owned(), message: e.to_string() })
}

fn is_level(word: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word))
}

/// The handle the daemon keeps to change the log filter; cheap to clone.
#[derive(Clone, Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Parses and applies a new filter (see [`parse_directive`]).
    pub fn set(&self, directive: &str) -> Result<(), LogLevelError> {
        let filter = parse_directive(directive)?;
        self.handle.reload(filter).map_err(|e| LogLevelError::Reload(e.to_string()))
    }

    /// The filter in force, as a directive string.
    pub fn current(&self) -> Option<String> {
        self.handle.with_current(|f| f.to_string()).ok()
    }
}

/// Builds the layered subscriber (reloadable filter, then the stderr formatter) without installing
/// it, so tests can use it as a scoped default.
pub fn subscriber(initial: EnvFilter) -> (impl tracing::Subscriber + Send + Sync + 'static, LogControl) {
    let (filter, handle) = reload::Layer::new(initial);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let subscriber = tracing_subscriber::registry().with(filter).with(fmt);
    (subscriber, LogControl { handle })
}

/// Installs the global subscriber with its filter from `env_var` (falling back to `default`) and
/// returns the handle that changes it later.
pub fn init(env_var: &str, default: &str) -> Result<LogControl, LogLevelError> {
    let initial = match EnvFilter::try_from_env(env_var) {
        Ok(f) => f,
        Err(_) => parse_directive(default)?,
    };
    let (subscriber, control) = subscriber(initial);
    // try_init also bridges `log` records from dependencies, as `fmt().init()` does.
    subscriber.try_init().map_err(|e| LogLevelError::Install(e.to_string()))?;
    Ok(control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_levels_and_directives() {
        for ok in ["debug", "INFO", " warn ", "error", "trace", "off", "info,ferry::proxy=debug"] {
            parse_directive(ok).unwrap_or_else(|e| panic!("{ok:?} refused: {e}"));
        }
        parse_directive("ferry[conn{id=1}]=trace").expect("span directive");
    }

    #[test]
    fn refuses_typos_and_bad_syntax_with_clear_messages() {
        let e = parse_directive("degub").expect_err("typo");
        assert!(matches!(&e, LogLevelError::UnknownLevel(w) if w == "degub"), "{e:?}");
        assert!(e.to_string().contains("expected one of trace, debug"), "{e}");
        let e = parse_directive("ferry=loud").expect_err("bad level in directive");
        assert!(matches!(e, LogLevelError::Syntax { .. }), "{e:?}");
        assert!(matches!(parse_directive("  "), Err(LogLevelError::Empty)));
        assert!(matches!(parse_directive("info,,debug"), Err(LogLevelError::Syntax { .. })));
    }

    #[test]
    fn reload_changes_what_is_enabled() {
        let (subscriber, control) = subscriber(parse_directive("info").expect("info"));
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            control.set("debug").expect("set debug");
            tracing::callsite::rebuild_interest_cache();
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert_eq!(control.current().as_deref(), Some("debug"));
            assert!(control.set("nope").is_err());
            assert_eq!(control.current().as_deref(), Some("debug"), "a refused level changes nothing");
            let e = super::super::StateError::from(control.set("nope").expect_err("typo"));
            assert!(matches!(e, super::super::StateError::Invalid(_)), "{e:?}");
        });
    }
}
