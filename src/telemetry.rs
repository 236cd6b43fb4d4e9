//! Logging: `tracing` with JSON lines when stdout is not a terminal (a container) and
//! readable text on a terminal. The level comes from `KDEDUP_LOG`, then `RUST_LOG`,
//! then `info`. `KDEDUP_LOG_FORMAT` (`json`, `text`, `auto`) overrides the choice.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = std::env::var("KDEDUP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    // librdkafka's own log lines and sqlx's per-statement lines are noisy at info.
    let filter = EnvFilter::try_new(format!("{filter},sqlx=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = match std::env::var("KDEDUP_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// The demo prints its own summary; only errors are logged unless KDEDUP_LOG says otherwise.
pub fn init_for_demo() {
    let filter = std::env::var("KDEDUP_LOG").unwrap_or_else(|_| "error".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .try_init();
}
