//! The command line of the `locus` binary: its subcommands and what each
//! runs. Here, not in `main.rs`, so that tests can read the settings locus
//! accepts (the docker-compose test does). It is the binary's layer, so it
//! reports with anyhow like `main` would; the library below it does not.

use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    auth::{Role, token},
    config::{ClusterArgs, DatabaseArgs, LogArgs, LogFormat, ServeConfig, StorageArgs},
    ingest::unix_micros,
    ingest_log,
    server::{self, Listeners},
    storage::{
        Tier, catalog, doctor, maintain,
        setup::{self, SetupOptions},
    },
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "locus",
    version,
    about = "GPS telemetry ingestion into PostgreSQL and TimescaleDB"
)]
pub struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "LOCUS_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC ingest and Prometheus metrics.
    Serve(Box<ServeConfig>),
    /// Bring the database to the schema locus needs (idempotent).
    Setup(SetupArgs),
    /// Report the tier, drift, sizes, compression, jobs and lag (and with
    /// --nats-url the log of --ack-after log); exit 1 when
    /// something needs attention.
    Doctor(Box<DoctorArgs>),
    /// Run locus's own storage jobs once (retention, hourly rollup), as
    /// `serve` does on its schedule.
    Maintain(MaintainArgs),
    /// Ask a running locus whether it is ready (gRPC health); exit 0 if so.
    /// For container health checks.
    Health(HealthArgs),
    /// Create, list and revoke API tokens.
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// PostgreSQL or TimescaleDB URL of the tracking database. Accepted
    /// before or after the token subcommand (`locus token create
    /// --database-url ...`); clap cannot make a global argument required,
    /// so its absence is reported when the command runs.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    command: TokenCommand,
}

impl TokenArgs {
    fn database(&self) -> anyhow::Result<DatabaseArgs> {
        let url = self.database_url.clone().ok_or_else(|| {
            anyhow::anyhow!("no database URL: give --database-url URL or set DATABASE_URL")
        })?;
        Ok(DatabaseArgs { url })
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it, once: only its hash is kept.
    Create {
        /// What the token is for (a device's name, a gateway's host...).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// The app_source the token is bound to (every role but admin).
        #[arg(long)]
        app_source: Option<String>,
        /// For a device token: a device it may write for (repeat for more).
        #[arg(long = "device")]
        devices: Vec<uuid::Uuid>,
        /// For a device token: registers a tracking app (Traccar Client,
        /// OwnTracks) by the identifier it sends, and binds the token to
        /// its device, a UUIDv5 of `<app_source>/<tracker id>`. OwnTracks'
        /// identifier is `<user>/<device>`.
        #[arg(long, requires = "user")]
        tracker_id: Option<String>,
        /// With --tracker-id: the user whose points the tracker sends.
        #[arg(long, requires = "tracker_id")]
        user: Option<uuid::Uuid>,
        /// A PEM client certificate that authenticates as this token over
        /// mTLS (`serve --tls-client-ca`), in place of the secret.
        #[arg(long)]
        client_cert: Option<std::path::PathBuf>,
    },
    /// List tokens (never their secrets).
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: serving instances refuse it within seconds.
    Revoke { id: uuid::Uuid },
}

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The gRPC address of the locus to ask (plain gRPC, no TLS).
    #[arg(
        long,
        env = "LOCUS_HEALTH_TARGET",
        default_value = "http://127.0.0.1:50051"
    )]
    target: String,
    /// Ask `GET <URL>` instead, ready on 200: the metrics listener's
    /// readiness (`http://127.0.0.1:9000/readyz`), which stays plain HTTP
    /// when --tls-cert puts the gRPC and HTTP listeners behind TLS.
    #[arg(long, env = "LOCUS_HEALTH_HTTP", value_name = "URL")]
    http: Option<String>,
}

/// How long `locus health` waits for an answer.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET url` over plain HTTP/1.1: whether it answered 200.
async fn http_ready(url: &str) -> anyhow::Result<bool> {
    use hyper_util::rt::TokioIo;
    let uri: hyper::Uri = url.parse().with_context(|| format!("--http {url:?}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--http takes an http:// URL (the metrics listener's /readyz), not {url:?}"
    );
    let authority = uri
        .authority()
        .with_context(|| format!("--http {url:?} names no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .body(axum::body::Body::empty())?;
    Ok(sender.send_request(request).await?.status() == hyper::StatusCode::OK)
}

/// Asks gRPC health at `target`: whether it is SERVING.
async fn grpc_ready(target: &str) -> anyhow::Result<bool> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = tonic::transport::Endpoint::from_shared(target.to_string())?
        .connect_timeout(HEALTH_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot reach {target}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    Ok(status == ServingStatus::Serving as i32)
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
    /// With --nats-url: the log of `--ack-after log` too (its backlog,
    /// writers and dead letters).
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct MaintainArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
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
    /// Create the database named by --database-url if the server has no
    /// such database yet, as `createdb` would.
    #[arg(long, env = "LOCUS_CREATE_DATABASE")]
    create_database: bool,
}

/// The error and its causes on one line, each cause said once: a cause
/// whose text its parent already holds (sqlx's database errors print their
/// source inside their own text) is left out.
pub fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Ends the process with this code, after printing what was asked.
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
pub struct Exit(pub u8);

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => {
            // Every setting is checked before a port is bound.
            server::check(&config).context("invalid configuration")?;
            crate::connections::fit_file_limit(&config)?;
            let listeners = Listeners::bind(
                config.grpc_addr,
                config.query.http_addr,
                config.metrics_addr,
            )
            .await
            .context("cannot bind the listen addresses")?;
            let shutdown = CancellationToken::new();
            crate::shutdown::cancel_on_signal(shutdown.clone())?;
            server::run(*config, listeners, shutdown).await?;
        }
        Command::Setup(args) => {
            args.database.validate()?;
            args.storage.validate()?;
            if args.create_database
                && !args.dry_run
                && let Some(name) = setup::create_database_if_missing(&args.database.url).await?
            {
                println!("-- created database {name:?}");
            }
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
            args.cluster.validate()?;
            args.log.validate(&args.cluster)?;
            let report =
                doctor::examine(&args.database.url, &opts, unix_micros(SystemTime::now())).await?;
            let log = match args.cluster.enabled() {
                true => Some(ingest_log::examine(&args.cluster, &args.log).await),
                false => None,
            };
            if args.json {
                let mut json = serde_json::to_value(&report)?;
                if let Some(log) = &log {
                    json["log"] = serde_json::to_value(log)?;
                }
                println!("{}", serde_json::to_string_pretty(&json)?);
            } else {
                print!("{}", doctor::render(&report));
                if let Some(log) = &log {
                    print!("{}", ingest_log::render(log));
                    for a in &log.attention {
                        println!("ATTENTION: {a}");
                    }
                }
            }
            if !report.attention.is_empty() || log.is_some_and(|l| !l.attention.is_empty()) {
                return Err(Exit(1).into());
            }
        }
        Command::Health(args) => {
            let ready = async {
                match &args.http {
                    Some(url) => http_ready(url).await,
                    None => grpc_ready(&args.target).await,
                }
            };
            let ready = tokio::time::timeout(HEALTH_TIMEOUT, ready)
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {HEALTH_TIMEOUT:?}"))??;
            if !ready {
                println!("not ready");
                return Err(Exit(1).into());
            }
            println!("ready");
        }
        Command::Token(args) => {
            let database = args.database()?;
            database.validate()?;
            let mut conn = setup::connect(&database.url).await?;
            token_command(&mut conn, args.command).await?;
        }
        Command::Maintain(args) => {
            args.database.validate()?;
            args.storage.validate()?;
            let mut conn = setup::connect(&args.database.url).await?;
            let tier = catalog::read(&mut conn).await?.tier;
            let turn = maintain::run_all(
                &mut conn,
                tier,
                &args.storage,
                unix_micros(SystemTime::now()),
            )
            .await?;
            match turn {
                maintain::Turn::Ran => println!("maintenance done on tier {tier}"),
                maintain::Turn::Busy => {
                    println!(
                        "maintenance skipped: another instance is running the storage jobs now"
                    );
                    return Err(Exit(75).into());
                }
            }
        }
    }
    Ok(())
}

async fn token_command(conn: &mut sqlx::PgConnection, command: TokenCommand) -> anyhow::Result<()> {
    let no_table = |e: token::TokenError| match &e {
        token::TokenError::Database(sqlx::Error::Database(d))
            if d.code().as_deref() == Some("42P01") =>
        {
            anyhow::anyhow!("there is no token table yet: run `locus setup` first")
        }
        _ => e.into(),
    };
    match command {
        TokenCommand::Create {
            name,
            role,
            app_source,
            mut devices,
            client_cert,
            tracker_id,
            user,
        } => {
            let client_cert = match client_cert {
                None => None,
                Some(path) => {
                    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
                    let cert = CertificateDer::from_pem_file(&path)
                        .with_context(|| format!("--client-cert {}", path.display()))?;
                    Some(cert.to_vec())
                }
            };
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let tracker = match (tracker_id, user) {
                (Some(tracker_id), Some(user)) => {
                    let app = match (role, app_source.as_deref()) {
                        (Role::Device, Some(app)) => app,
                        _ => anyhow::bail!(
                            "--tracker-id registers a tracker for a device token: give --role \
                             device and --app-source"
                        ),
                    };
                    let t = crate::trackers::registry::register(&mut tx, app, &tracker_id, user)
                        .await
                        .map_err(|e| match e {
                            crate::trackers::registry::RegisterError::Database(
                                sqlx::Error::Database(d),
                            ) if d.code().as_deref() == Some("42P01") => anyhow::anyhow!(
                                "there is no tracker table yet: run `locus setup` first"
                            ),
                            e => e.into(),
                        })?;
                    devices.push(t.device_id);
                    Some(t)
                }
                _ => None,
            };
            let new = token::NewToken {
                name,
                role,
                app_source,
                devices,
                client_cert,
            };
            let t = token::create(&mut tx, &new).await.map_err(no_table)?;
            tx.commit().await?;
            if let Some(tr) = tracker {
                eprintln!(
                    "tracker {:?} of {}: device {}, user {}",
                    tr.tracker_id, tr.app_source, tr.device_id, tr.user_id
                );
            }
            eprintln!(
                "created {} token {} ({}); it is shown once, keep it now:",
                new.role, t.id, new.name
            );
            println!("{t}");
        }
        TokenCommand::List { all, json } => {
            let tokens = token::list(conn, all).await.map_err(no_table)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!("id\tname\trole\tapp_source\tdevices\tclient_cert\tcreated\trevoked");
                for t in tokens {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        t.id,
                        t.name,
                        t.role,
                        t.app_source.as_deref().unwrap_or("*"),
                        t.device_ids.len(),
                        t.client_cert,
                        t.created_at.to_rfc3339(),
                        t.revoked_at.map(|r| r.to_rfc3339()).unwrap_or_default()
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            token::revoke(conn, id).await.map_err(no_table)?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// Logs to stderr, as text or JSON, at the level `RUST_LOG` sets (default info).
pub fn init_logging(format: LogFormat) {
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
