//! The `locus` binary: parses the command line and calls into the library.

use std::{process::ExitCode, time::SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use locus::{
    config::{DatabaseArgs, LogFormat, ServeConfig, StorageArgs},
    ingest::unix_micros,
    server::{self, Listeners},
    storage::{
        catalog, doctor, maintain,
        setup::{self, SetupOptions, Tier},
    },
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "locus",
    version,
    about = "GPS telemetry ingestion into PostgreSQL and TimescaleDB"
)]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "LOCUS_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC ingest and Prometheus metrics.
    Serve(Box<ServeConfig>),
    /// Bring the database to the schema locus needs (idempotent).
    Setup(SetupArgs),
    /// Report the tier, drift, sizes, compression, jobs and lag; exit 1 when
    /// something needs attention.
    Doctor(DoctorArgs),
    /// Run locus's own storage jobs once (retention, hourly rollup), as
    /// `serve` does on its schedule.
    Maintain(MaintainArgs),
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct MaintainArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Debug, clap::Args)]
struct SetupArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
    /// Print the SQL that would run, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Fail unless the database offers this tier.
    #[arg(long, env = "LOCUS_REQUIRE_TIER", value_enum)]
    require_tier: Option<Tier>,
}

/// Ends the process with this code, after printing what was asked.
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
struct Exit(u8);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Exit>().is_some() => {
            ExitCode::from(e.downcast_ref::<Exit>().map_or(1, |x| x.0))
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => {
            // Every setting is checked before a port is bound.
            config.validate().context("invalid configuration")?;
            let listeners = Listeners::bind(
                config.grpc_addr,
                config.query.http_addr,
                config.metrics_addr,
            )
            .await
            .context("cannot bind the listen addresses")?;
            let shutdown = CancellationToken::new();
            locus::shutdown::cancel_on_signal(shutdown.clone())?;
            server::run(*config, listeners, shutdown).await?;
        }
        Command::Setup(args) => {
            args.database.validate()?;
            args.storage.validate()?;
            let opts = SetupOptions {
                storage: args.storage,
                require_tier: args.require_tier,
            };
            let plan = setup::run(
                &args.database.url,
                &opts,
                args.dry_run,
                unix_micros(SystemTime::now()),
            )
            .await?;
            print!("{plan}");
            if !args.dry_run && !plan.steps.is_empty() {
                println!("-- applied {} steps", plan.steps.len());
            }
        }
        Command::Doctor(args) => {
            args.database.validate()?;
            args.storage.validate()?;
            let opts = SetupOptions {
                storage: args.storage,
                require_tier: None,
            };
            let report =
                doctor::examine(&args.database.url, &opts, unix_micros(SystemTime::now())).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", doctor::render(&report));
            }
            if !report.attention.is_empty() {
                return Err(Exit(1).into());
            }
        }
        Command::Maintain(args) => {
            args.database.validate()?;
            args.storage.validate()?;
            let mut conn = setup::connect(&args.database.url).await?;
            let tier = catalog::read(&mut conn).await?.tier;
            maintain::run_all(
                &mut conn,
                tier,
                &args.storage,
                unix_micros(SystemTime::now()),
            )
            .await?;
            println!("maintenance done on tier {tier}");
        }
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
