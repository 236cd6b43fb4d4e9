//! Logging: `tracing` with JSON lines when stdout is not a terminal (a container) and
//! readable text on a terminal. The level comes from `KDEDUP_LOG`, then `RUST_LOG`,
//! then `info`. `KDEDUP_LOG_FORMAT` (`json`, `text`, `auto`) overrides the choice.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = std::env::var("KDEDUP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    // sqlx's per-statement lines are noisy at info: quiet by default, but a filter that
    // names sqlx itself (KDEDUP_LOG=info,sqlx=debug) wins, as it comes later.
    let filter = match EnvFilter::try_new(format!("sqlx=warn,{filter}")) {
        Ok(f) => f,
        Err(e) => {
            // Logging is not set up yet: say it on stderr, once, and carry on at info.
            eprintln!("kdedup: KDEDUP_LOG/RUST_LOG {filter:?} is not a valid filter ({e}); logging at info. Example: KDEDUP_LOG=info,kdedup=debug");
            EnvFilter::new("sqlx=warn,info")
        }
    };
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
