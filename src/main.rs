//! The `kdedup` binary: parse and validate config, init telemetry, run until a signal,
//! drain with a deadline. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use kdedup::cli::env::ProcessEnv;
use kdedup::cli::{
    Cli, Command, ConfigError, DbArgs, DemoArgs, PruneArgs, ReplayArgs, RunArgs, EX_CONFIG,
    EX_USAGE,
};
use kdedup::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// jemalloc rather than glibc's malloc: the hot path allocates and frees every message's
/// key, value and headers, and glibc spent about a quarter of kdedup's CPU on it (bench/README.md,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Prune(args) => prune(args).await,
        Command::Inspect(args) => match args.validate(&ProcessEnv) {
            Ok(inspect) => kdedup::ops::inspect_command(&inspect).await,
            Err(e) => usage_error(e),
        },
        Command::Stats(args) => match args.db.validate(&ProcessEnv) {
            Ok(db) => kdedup::ops::stats_command(&db, args.json).await,
            Err(e) => usage_error(e),
        },
        Command::Replay(args) => replay(*args).await,
        Command::Demo(args) => demo(args).await,
    }
}

/// `kdedup run`: the sidecar, until a signal; then a drain within `--shutdown-timeout`.
async fn run(args: RunArgs) -> ExitCode {
    let cfg = match args.validate(&ProcessEnv) {
        Ok(cfg) => cfg,
        Err(e) => return usage_error(e),
    };
    kdedup::telemetry::init();
    info!(config = ?cfg, version = env!("CARGO_PKG_VERSION"), "starting kdedup");
    warn_unknown_variables();
    let shutdown_timeout = cfg.shutdown_timeout;
    let stop = CancellationToken::new();
    let mut app = tokio::spawn(kdedup::app::run(cfg, stop.clone(), Metrics::new(), None));
    let result = tokio::select! {
        r = &mut app => r,
        signal = shutdown_signal() => {
            info!(signal, deadline_s = shutdown_timeout.as_secs_f64(), "stopping: draining");
            stop.cancel();
            match tokio::time::timeout(shutdown_timeout, &mut app).await {
                Ok(r) => r,
                Err(_) => {
                    warn!("drain deadline reached; exiting with work left (it will be redelivered and absorbed by the gate)");
                    return ExitCode::SUCCESS;
                }
            }
        }
    };
    match result {
        Ok(Ok(())) => {
            info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            error!(error = format!("{e:#}"), "kdedup failed");
            failure_code(&e)
        }
        Err(join) => {
            error!(error = %join, "kdedup crashed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: DbArgs) -> ExitCode {
    let db = match args.validate(&ProcessEnv) {
        Ok(db) => db,
        Err(e) => return usage_error(e),
    };
    kdedup::telemetry::init();
    let result = async {
        connect_once(&db).await?;
        let pool = kdedup::store::pool(&db)?;
        if let Err(e) = kdedup::store::migrate(&pool, &db.schema).await {
            return Err(match kdedup::store::migration_cannot_heal(&e) {
                Some(fix) => kdedup::store::MigrateConfigError {
                    schema: db.schema.clone(),
                    tries: 1,
                    cause: e.to_string(),
                    fix,
                }
                .into(),
                None => anyhow::Error::new(e),
            });
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            info!(schema = db.schema, "migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "migration failed");
            failure_code(&e)
        }
    }
}

async fn prune(args: PruneArgs) -> ExitCode {
    let round = args.round_settings();
    let (db, settings) = match args
        .db
        .validate(&ProcessEnv)
        .and_then(|db| Ok((db, round?)))
    {
        Ok(x) => x,
        Err(e) => return usage_error(e),
    };
    kdedup::telemetry::init();
    let result = async {
        connect_once(&db).await?;
        let mut conn = kdedup::store::dedicated_connection(&db).await?;
        let metrics = Metrics::new();
        let n = kdedup::pruner::prune_round(
            &mut conn,
            chrono::Utc::now(),
            &settings,
            &metrics,
            &CancellationToken::new(),
        )
        .await?;
        anyhow::Ok(n)
    }
    .await;
    match result {
        Ok(n) => {
            info!(rows = n, schema = db.schema, "pruned expired rows");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "prune failed");
            failure_code(&e)
        }
    }
}

async fn replay(args: ReplayArgs) -> ExitCode {
    kdedup::telemetry::init();
    let replay = match args.validate(&ProcessEnv) {
        Ok(replay) => replay,
        Err(e) => return usage_error(e),
    };
    match kdedup::replay::run(replay).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kdedup replay: {e:#}");
            failure_code(&e)
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    kdedup::telemetry::init_for_demo();
    let demo = match args.validate(&ProcessEnv) {
        Ok(demo) => demo,
        Err(e) => return usage_error(e),
    };
    let run_settings = |brokers: &str, metrics_addr: &str, topics: (&str, &str)| {
        Ok(kdedup::cli::validate::demo_run_settings(
            &demo,
            brokers,
            metrics_addr,
            topics,
        )?)
    };
    match kdedup::demo::run(demo.clone(), run_settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Names every `KDEDUP_*` variable no setting reads: a typo would otherwise be a setting
/// silently left at its default.
fn warn_unknown_variables() {
    for (variable, closest) in kdedup::cli::env::unknown_env_vars(&ProcessEnv) {
        match closest {
            Some(closest) => warn!(variable, did_you_mean = closest,
                "unknown KDEDUP_* variable: no setting reads it, so it has no effect"),
            None => warn!(variable,
                "unknown KDEDUP_* variable: no setting reads it, so it has no effect (kdedup run --help lists them)"),
        }
    }
}

/// Connects once (for the one-shot commands) and says how; a refused setting is named.
async fn connect_once(db: &kdedup::settings::DbSettings) -> anyhow::Result<()> {
    match kdedup::store::check_connection(db).await? {
        Ok(security) => {
            security.log(db);
            Ok(())
        }
        Err(e) => Err(kdedup::store::ConnectConfigError::or_context(db, e)),
    }
}

/// Exit code of a failed command: `EX_CONFIG` (78) when Postgres refused the connection
/// settings (TLS, login, database) or running sidecars serve a conflicting configuration,
/// `EX_USAGE` (64) when the Postgres sink's statement
/// does not work against the database (both no restart fixes); 1 for anything else.
fn failure_code(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| {
        c.downcast_ref::<kdedup::sink::postgres::SinkSetupError>()
            .is_some()
    }) {
        return ExitCode::from(EX_USAGE as u8);
    }
    if e.chain().any(|c| {
        c.downcast_ref::<kdedup::store::ConnectConfigError>()
            .is_some()
            || c.downcast_ref::<kdedup::app::drift::DriftError>().is_some()
            || c.downcast_ref::<kdedup::store::MigrateConfigError>()
                .is_some()
    }) {
        ExitCode::from(EX_CONFIG as u8)
    } else {
        ExitCode::FAILURE
    }
}

fn usage_error(e: ConfigError) -> ExitCode {
    for line in e.to_string().lines() {
        eprintln!("kdedup: {line}");
    }
    ExitCode::from(EX_USAGE as u8)
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
