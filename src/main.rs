//! The `pgrelay` command: `serve`, `migrate`, `token`, `tail` (see the README).
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::future::poll_fn;
use pgrelay::capture::outbox::{self, Batch};
use pgrelay::capture::position::Position;
use pgrelay::capture::{listener, wakeup};
use pgrelay::config::parse_duration;
use pgrelay::config::RelayConfig;
use pgrelay::db::{embedded::EmbeddedPostgres, migrate, Database};
use pgrelay::jwt::{self, Verifier};
use pgrelay::server::Relay;
use serde_json::{Map, Value};

/// Used only in development mode (no DATABASE_URL): the embedded database is throwaway too.
const DEV_SECRET: &str = "pgrelay-dev-secret-not-for-production";

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "Postgres changes, authorized per user, delivered to WebSocket rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay. Without DATABASE_URL, starts an embedded Postgres with demo data.
    Serve(Box<ServeArgs>),
    /// Install or update the trigger library and the example schema in DATABASE_URL.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Install only the trigger library (sql/), not the example schema.
        #[arg(long)]
        library_only: bool,
    },
    /// Print an HS256 token signed with PGRELAY_JWT_SECRET (for development and tests).
    Token {
        #[arg(long)]
        sub: String,
        /// Lifetime: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Extra claims, key=value (repeatable); values that parse as JSON are kept as JSON.
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, Value)>,
        #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
    },
    /// The development board's helpers.
    #[command(subcommand)]
    Demo(DemoCommand),
    /// Exit 0 if the relay at PGRELAY_BIND answers /healthz (or /readyz with --ready), else 1:
    /// a container HEALTHCHECK for an image without curl.
    Health {
        #[arg(long, env = "PGRELAY_BIND", default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// Check /readyz (database reachable, changes flowing) instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
    /// Print changes as the relay sees them, one JSON line each.
    Tail {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Only changes published to this room.
        #[arg(long)]
        room: Option<String>,
    },
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Write realistic activity (tasks moving, created, commented) to the demo schema with SQL.
    Simulate {
        /// The database (`pgrelay serve` in development mode prints it).
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Changes per second.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The database to LISTEN to and authorize against (unset: embedded Postgres).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// HTTP/WebSocket listen address.
    #[arg(long, env = "PGRELAY_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// HS256 secret (required unless in development mode or a public key is given).
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM public key (RS*/ES*/EdDSA) or JWKS file to verify tokens with, instead of a secret;
    /// reloaded when it changes.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<PathBuf>,
    /// JWKS URL of an identity provider (http:// or https://) to verify tokens with: fetched at
    /// start, again for a token with an unknown kid (at most every 10s), and periodically.
    #[arg(long, env = "PGRELAY_JWT_JWKS_URL")]
    jwt_jwks_url: Option<String>,
    /// How often to fetch the JWKS URL again.
    #[arg(long, env = "PGRELAY_JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    jwt_jwks_refresh: Duration,
    /// PEM CA certificate(s) to trust for an https JWKS URL instead of the system's CAs.
    #[arg(long, env = "PGRELAY_JWT_JWKS_CA_FILE")]
    jwt_jwks_ca_file: Option<PathBuf>,
    /// Where the embedded Postgres keeps its data.
    #[arg(long, env = "PGRELAY_DATA_DIR", default_value = ".pgrelay")]
    data_dir: PathBuf,
    /// Require this `iss` claim in tokens.
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Require this audience in tokens' `aud` claim.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Browser origins allowed to connect, comma-separated (default: any).
    #[arg(long, env = "PGRELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Read the outbox at least this often even without a notification.
    #[arg(long, env = "PGRELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// How often this relay tells the others it is alive (presence); a relay silent for three
    /// intervals is dropped from presence everywhere.
    #[arg(long, env = "PGRELAY_PRESENCE_HEARTBEAT", default_value = "5s", value_parser = parse_duration)]
    presence_heartbeat: Duration,
    /// Database queries replays may run at once (outbox reads and their authorization); the rest
    /// of the pool is kept for joins and live delivery.
    #[arg(long, env = "PGRELAY_REPLAY_READS", default_value_t = 2)]
    replay_reads: usize,
    /// Replays served at once; more wait their turn in arrival order.
    #[arg(long, env = "PGRELAY_REPLAYS", default_value_t = 1024)]
    replays: usize,
    /// Replays of one user served at once; more wait their turn in arrival order.
    #[arg(long, env = "PGRELAY_REPLAYS_PER_USER", default_value_t = 4)]
    replays_per_user: usize,
    /// MiB of outbox pages kept in memory for replays to share.
    #[arg(long, env = "PGRELAY_REPLAY_WINDOW_MB", default_value_t = 64)]
    replay_window_mb: usize,
    /// A replay whose client takes nothing for this long is closed with 4008 (resumable).
    #[arg(long, env = "PGRELAY_REPLAY_STALL", default_value = "10s", value_parser = parse_duration)]
    replay_stall: Duration,
    /// How often every room membership is put to its join policy again (what the outbox cannot
    /// show: changes made with triggers disabled, a policy replaced without the event trigger).
    #[arg(long, env = "PGRELAY_RECHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    recheck_interval: Duration,
    /// On SIGTERM/SIGINT: how long to keep serving open connections (with /readyz at 503 and new
    /// connections refused) before closing them with 1001. A second signal ends it early.
    #[arg(long, env = "PGRELAY_DRAIN_GRACE", default_value = "10s", value_parser = parse_duration)]
    drain_grace: Duration,
    /// Longest any database statement of the relay may run (policies included): a read policy
    /// that takes longer for a row is denied for that row, a join policy fails that join.
    #[arg(long, env = "PGRELAY_STATEMENT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    statement_timeout: Duration,
    /// A `presence_state` lists a room's connections up to this many bytes, then says
    /// `"truncated": true`.
    #[arg(long, env = "PGRELAY_PRESENCE_MAX_STATE_BYTES", default_value_t = 64 * 1024)]
    presence_max_state_bytes: usize,
    /// Connections of other relays held in this relay's presence view (all rooms).
    #[arg(
        long,
        env = "PGRELAY_PRESENCE_MAX_REMOTE_ENTRIES",
        default_value_t = 200_000
    )]
    presence_max_remote_entries: usize,
    /// This relay sends its full presence state to the others at most this often.
    #[arg(long, env = "PGRELAY_PRESENCE_RESYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    presence_resync_interval: Duration,
}

/// A failure and the exit code it maps to.
enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Failure {
        Failure::Runtime(err)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgrelay=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("pgrelay: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(err)) => {
            eprintln!("pgrelay: configuration error: {err:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(err)) => {
            eprintln!("pgrelay: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate {
            database_url,
            library_only,
        } => {
            migrate::migrate(&database_url, library_only).await?;
            println!(
                "pgrelay: {} installed",
                if library_only {
                    "trigger library"
                } else {
                    "trigger library and example schema"
                }
            );
            Ok(())
        }
        Command::Token {
            sub,
            ttl,
            claims,
            jwt_secret,
        } => {
            let secret = match jwt_secret {
                Some(secret) => secret,
                None if std::env::var_os("DATABASE_URL").is_none() => DEV_SECRET.to_owned(),
                None => {
                    return Err(Failure::Config(anyhow::anyhow!(
                        "PGRELAY_JWT_SECRET is not set"
                    )))
                }
            };
            let extra: Map<String, Value> = claims.into_iter().collect();
            println!("{}", jwt::mint(secret.as_bytes(), &sub, ttl, &extra)?);
            Ok(())
        }
        Command::Demo(DemoCommand::Simulate {
            database_url,
            rate,
            duration,
        }) => pgrelay::demo::simulate::run(&database_url, rate, duration)
            .await
            .map_err(Failure::Runtime),
        Command::Health { bind, ready } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            health(bind, path).map_err(Failure::Runtime)
        }
        Command::Tail { database_url, room } => tail(&database_url, room.as_deref())
            .await
            .map_err(Failure::Runtime),
    }
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    match pgrelay::open_files::raise_open_files_limit() {
        Ok(limit) => tracing::info!(
            limit,
            "open files limit (each connection needs one; raise the hard limit for more)"
        ),
        Err(err) => tracing::warn!(error = %err, "cannot read or raise the open files limit"),
    }
    let dev_mode = args.database_url.is_none();
    if args.jwt_public_key_file.is_some() && args.jwt_jwks_url.is_some() {
        return Err(Failure::Config(anyhow::anyhow!(
            "set one of PGRELAY_JWT_PUBLIC_KEY_FILE and PGRELAY_JWT_JWKS_URL, not both"
        )));
    }
    let public_keys = args.jwt_public_key_file.is_some() || args.jwt_jwks_url.is_some();
    let verifier = match (&args.jwt_public_key_file, &args.jwt_secret) {
        (Some(path), _) => Verifier::from_key_file(path).map_err(Failure::Config)?,
        (None, _) if args.jwt_jwks_url.is_some() => {
            let url = args.jwt_jwks_url.as_deref().unwrap_or_default();
            let options = pgrelay::jwks::JwksOptions {
                refresh_every: args.jwt_jwks_refresh,
                ..Default::default()
            };
            let source =
                pgrelay::jwks::JwksSource::new(url, args.jwt_jwks_ca_file.as_deref(), options)
                    .map_err(Failure::Config)?;
            Verifier::from_jwks_url(source).await?
        }
        (None, Some(secret)) if !secret.is_empty() => Verifier::from_secret(secret.as_bytes()),
        (None, _) if dev_mode => Verifier::from_secret(DEV_SECRET.as_bytes()),
        (None, _) => {
            return Err(Failure::Config(anyhow::anyhow!(
                "set PGRELAY_JWT_SECRET or PGRELAY_JWT_PUBLIC_KEY_FILE"
            )))
        }
    };

    let verifier = match &args.jwt_issuer {
        Some(issuer) => verifier.with_issuer(issuer),
        None => verifier,
    };
    let verifier = match &args.jwt_audience {
        Some(audience) => verifier.with_audience(audience),
        None => verifier,
    };
    if public_keys && !verifier.checks_issuer_or_audience() {
        // An identity provider signs tokens for every application of the tenant: without an
        // audience or issuer check, a token meant for another application gets in here too.
        tracing::warn!(
            "tokens are verified with public keys but neither an audience nor an issuer is required: \
             set PGRELAY_JWT_AUDIENCE and/or PGRELAY_JWT_ISSUER so that tokens issued for other \
             applications are refused"
        );
    }

    // Development mode: an embedded database, migrated, with demo data on first start.
    let mut embedded = None;
    let database_url = match args.database_url {
        Some(url) => {
            check_library(&url).await?;
            url
        }
        None if !EmbeddedPostgres::binaries_available() => {
            return Err(Failure::Config(anyhow::anyhow!(
                "DATABASE_URL is not set and there are no PostgreSQL server binaries here for an \
                 embedded development database: set DATABASE_URL (always, in a container)"
            )))
        }
        None => {
            let data_dir = args.data_dir.clone();
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&data_dir))
                .await
                .context("starting the embedded database")??;
            let url = pg.url("postgres");
            migrate::migrate(&url, false).await?;
            if pg.created {
                migrate::load_demo_data(&url).await?;
            }
            embedded = Some(pg);
            url
        }
    };

    let mut config = RelayConfig::new(database_url.clone(), verifier);
    config.bind = args.bind;
    config.poll_interval = args.poll_interval;
    config.recheck_interval = args.recheck_interval;
    config.statement_timeout = args.statement_timeout;
    config.presence.heartbeat = args.presence_heartbeat;
    config.presence.relay_timeout = 3 * args.presence_heartbeat;
    config.presence.max_state_bytes = args.presence_max_state_bytes;
    config.presence.max_remote_entries = args.presence_max_remote_entries;
    config.presence.resync_interval = args.presence_resync_interval;
    config.allowed_origins = args.allowed_origins;
    config.replay = pgrelay::config::ReplayBudget {
        reads: args.replay_reads,
        running: args.replays,
        per_user: args.replays_per_user,
        window_bytes: args.replay_window_mb.saturating_mul(1024 * 1024),
        stall: args.replay_stall,
    };
    if embedded.is_some() {
        // The board and its demo endpoints: development mode only, never with a real database.
        config.demo = Some(pgrelay::demo::Demo {
            secret: DEV_SECRET.as_bytes().to_vec(),
        });
    }
    let verifier_for_reloads = config.verifier.clone();
    let verifier_for_jwks = config.verifier.clone();
    let relay = Relay::start(config).await.map_err(Failure::Config)?;
    if let Some(path) = args.jwt_public_key_file.clone() {
        // Rotating keys (a JWKS file, say) needs no restart.
        let every = Duration::from_secs(2);
        let forever = tokio_util::sync::CancellationToken::new();
        tokio::spawn(jwt::watch_key_file(
            verifier_for_reloads,
            path,
            every,
            forever,
        ));
    }
    // Keys from a URL are refreshed until the process ends.
    tokio::spawn(jwt::refresh_jwks(
        verifier_for_jwks,
        tokio_util::sync::CancellationToken::new(),
    ));
    if embedded.is_some() {
        print_dev_banner(&relay, &database_url)?;
    }

    wait_for_signal().await?;
    tokio::select! {
        () = relay.drain(args.drain_grace) => {}
        signalled = wait_for_signal() => {
            signalled?;
            tracing::info!("second signal: ending the drain early");
        }
    }
    tracing::info!("shutting down");
    relay.shutdown().await;
    drop(embedded);
    Ok(())
}

async fn check_library(url: &str) -> Result<(), Failure> {
    let db = Database::from_url(url).map_err(Failure::Config)?;
    let (client, connection) = db.connect().await.context("connecting to DATABASE_URL")?;
    let io = tokio::spawn(connection);
    let installed = migrate::library_installed(&client).await?;
    drop(client);
    let _ = io.await;
    if !installed {
        return Err(Failure::Config(anyhow::anyhow!(
            "the pgrelay trigger library is not installed in DATABASE_URL; run `pgrelay migrate` first"
        )));
    }
    Ok(())
}

fn print_dev_banner(relay: &Relay, database_url: &str) -> anyhow::Result<()> {
    let addr = relay.local_addr();
    println!("pgrelay is running (development mode, embedded Postgres)\n");
    println!("  Live board  http://{addr}/");
    println!("  WebSocket   ws://{addr}/ws?token=<token>");
    println!("  Health      http://{addr}/readyz   Metrics http://{addr}/metrics");
    println!("  Database    psql {database_url}");
    println!("  Activity    DATABASE_URL={database_url} pgrelay demo simulate\n");
    println!("Dev tokens (valid 24h):");
    for (user, name, note) in pgrelay::demo::USERS {
        let token = jwt::mint(
            DEV_SECRET.as_bytes(),
            user,
            Duration::from_secs(86400),
            &Map::new(),
        )?;
        println!("  {user} {name:<6} ({note})\n     {token}");
    }
    println!("\nPress Ctrl-C to stop.");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// `pgrelay tail`: reads the outbox like the relay does (no authorization: it is a DBA's tool).
async fn tail(database_url: &str, room: Option<&str>) -> anyhow::Result<()> {
    let (client, mut connection) = Database::from_url(database_url)?
        .connect()
        .await
        .context("connecting to DATABASE_URL")?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let forward = wake.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if matches!(message, tokio_postgres::AsyncMessage::Notification(_)) {
                forward.notify_one();
            }
        }
        forward.notify_one();
    });
    client
        .batch_execute(&format!("LISTEN {}", listener::CHANNEL))
        .await
        .context("listening for changes")?;
    // Writers notify only while a relay sleeps (see capture::wakeup). `tail` announces a sleep for
    // as long as it runs (so writers notify meanwhile), then waits for the writers that did not
    // notify before it starts reading.
    let client = Arc::new(client);
    let _sleeping = wakeup::Sleeping::announce(client.clone()).await?;
    wakeup::barrier(client.clone()).await?;
    let mut since = outbox::current_snapshot(&client).await?;
    let statement = client
        .prepare(outbox::READ_BATCH)
        .await
        .context("preparing the outbox read")?;
    loop {
        let mut batch = Batch::read(&client, &statement, &since, None, None).await?;
        while let Some(chunk) = batch
            .next_kept(1000, |c| {
                room.is_none_or(|r| c.rooms.iter().any(|x| x == r))
            })
            .await?
        {
            for change in &chunk {
                let id = Position::Within {
                    since: batch.since.clone(),
                    upto: batch.upto.clone(),
                    change_id: change.id,
                };
                // An invalidation (a TRUNCATE, a replaced function) is no row change.
                let op = if change.control {
                    "INVALIDATE"
                } else {
                    change.op.as_str()
                };
                let line = serde_json::json!({
                    "id": id.to_string(), "table": change.table, "op": op,
                    "entity": change.entity, "rooms": change.rooms, "row": change.row,
                    "old": change.old, "ts": change.ts,
                });
                println!("{line}");
            }
        }
        since = batch.upto;
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if client.is_closed() {
            anyhow::bail!("the database connection closed");
        }
    }
}

/// One GET on the loopback interface (a bind address of 0.0.0.0 or :: is reached there).
fn health(bind: SocketAddr, path: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut addr = bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .take(64 * 1024)
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer of {addr}{path}"))?;
    let status = response.split_whitespace().nth(1).unwrap_or("none");
    anyhow::ensure!(status == "200", "{addr}{path} answered {status}");
    Ok(())
}

fn parse_claim(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {text:?}"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}
