//! Tracing set-up shared by every binary: human-readable logs on stderr by
//! default, JSON lines when asked, filtered by `RUST_LOG`.

use tracing_subscriber::{fmt, EnvFilter};

/// Output format of the process logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global tracing subscriber, writing to stderr so stdout stays
/// free for command output and metric lines.
///
/// `default_filter` applies when `RUST_LOG` is unset, e.g. `"info"`. Calling
/// this twice is harmless: the second call keeps the first subscriber.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal, never in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
