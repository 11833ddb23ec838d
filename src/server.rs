//! The relay process: the HTTP routes and the background tasks, built from the configuration,
//! started together and stopped together.
//!
//! ```text
//!   listener ──wake──▶ reader ──chunks──▶ pipeline ──frames──▶ client queues ──▶ /ws, /sse
//!                        │               │       │
//!                      outbox      authorize   fanout (rooms)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::authorize::Authorizer;
use crate::capture::position::PositionCodec;
use crate::capture::{listener, reader::Reader, retention};
use crate::config::RelayConfig;
use crate::db::settings;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::presence::{self, signing::BusKey, Presence};
use crate::resume::Replays;
use crate::rooms::Hub;
use crate::subscribe::Subscriptions;
use crate::transport::{cors, sse, ws};

pub use crate::transport::AppState;

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    shutdown: CancellationToken,
    draining: CancellationToken,
    metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Binds the listen address and starts serving and reading changes.
    pub async fn start(config: RelayConfig) -> anyhow::Result<Relay> {
        let db = crate::db::Database::from_url(&config.database_url)?;
        anyhow::ensure!(
            !config.statement_timeout.is_zero(),
            "the statement timeout must be more than 0"
        );
        // The relay's queries are short and run thousands of times a second: compiling them
        // with JIT (which Postgres does whenever an estimate is large, such as for a big chunk of
        // policy checks) costs far more than it saves.
        let demo = config.demo.clone();
        let no_jit = settings::with_setting(&db, "jit", "off");
        let pool = build_pool(
            &settings::with_statement_timeout(&no_jit, config.statement_timeout),
            config.pool_size,
            config.pool_timeout,
        )?;
        // Outbox reads stream while the relay delivers what they read (see `db::settings`).
        let read_pool = build_pool(
            &settings::with_statement_timeout(
                &no_jit,
                settings::OUTBOX_READ_TIMEOUT.max(config.statement_timeout),
            ),
            config.pool_size,
            config.pool_timeout,
        )?;
        let timed = settings::with_statement_timeout(&db, config.statement_timeout);
        let secret = load_secret(&pool).await?;
        let codec = PositionCodec::new(&secret);
        let shutdown = CancellationToken::new();
        let draining = CancellationToken::new();
        let retention_pool = pool.clone();
        let status_pool = pool.clone();
        let metrics = Arc::new(Metrics::default());
        let wake = Arc::new(Notify::new());
        let listening = Arc::new(listener::Listening::default());
        let (presence, presence_ops) = Presence::new(config.presence);
        let hub = Arc::new(Hub::new(presence.clone()));
        let status_hub = hub.clone();
        let sse_opens = crate::transport::limits::BucketPerUser::new(
            config.limits.joins_per_second,
            config.limits.join_burst,
        );
        let authorizer = Authorizer::new(pool.clone(), metrics.clone());
        let replays = Arc::new(Replays::new(
            pool.clone(),
            read_pool.clone(),
            authorizer.clone(),
            hub.clone(),
            codec.clone(),
            metrics.clone(),
            config.replay,
        ));
        let state = AppState {
            subscriptions: Subscriptions {
                pool: pool.clone(),
                codec: codec.clone(),
                wake: wake.clone(),
                hub: hub.clone(),
                authorizer: authorizer.clone(),
                metrics: metrics.clone(),
                replays,
            },
            hub,
            verifier: config.verifier,
            metrics: metrics.clone(),
            limits: config.limits,
            allowed_origins: Arc::new(config.allowed_origins),
            connections_per_user: Arc::default(),
            sse_opens: Arc::new(sse_opens),
            shutdown: shutdown.clone(),
            draining: draining.clone(),
        };
        let recheck_hub = state.hub.clone();
        let recheck_authorizer = authorizer.clone();
        let reader = Reader {
            pool,
            read_pool,
            consumer: Pipeline {
                hub: state.hub.clone(),
                authorizer,
                metrics: metrics.clone(),
                codec,
            },
            metrics: metrics.clone(),
            wake: wake.clone(),
            listening: listening.clone(),
            // The barrier waits for writers on purpose, as long as they take.
            db: settings::with_statement_timeout(&db, Duration::ZERO),
            poll_interval: config.poll_interval,
        };

        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.bind))?;
        let addr = listener.local_addr()?;
        let listener = without_nagle(listener);
        let app = Router::new()
            .route("/ws", get(ws::upgrade))
            .route(
                "/sse",
                get(sse::stream).options(cors::preflight).layer(
                    axum::middleware::from_fn_with_state(state.clone(), cors::allow),
                ),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text));
        let app = match demo {
            Some(demo) => app.merge(crate::demo::routes(demo)),
            None => app,
        }
        .with_state(state);

        let graceful = shutdown.clone();
        let serve = async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { graceful.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "HTTP server failed");
            }
        };
        let interval = config.maintenance_interval;
        let tasks = vec![
            tokio::spawn(listener::run(
                timed.clone(),
                wake,
                listening,
                metrics.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(reader.run(shutdown.clone())),
            tokio::spawn(crate::status::run(
                status_pool,
                status_hub,
                metrics.clone(),
                interval,
                shutdown.clone(),
            )),
            tokio::spawn(retention::run(retention_pool, interval, shutdown.clone())),
            tokio::spawn(presence::bus::run(
                timed,
                BusKey::derive(&secret),
                presence.clone(),
                presence_ops,
                metrics.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(presence::sweep(presence, metrics.clone(), shutdown.clone())),
            tokio::spawn(crate::recheck::periodically(
                recheck_hub,
                recheck_authorizer,
                metrics.clone(),
                config.recheck_interval.max(Duration::from_millis(10)),
                shutdown.clone(),
            )),
            tokio::spawn(serve),
        ];
        tracing::info!(%addr, "pgrelay listening");
        Ok(Relay {
            addr,
            shutdown,
            draining,
            metrics,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves when the relay has been asked to stop.
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await
    }

    /// The first half of a graceful stop: `/readyz` answers 503 from now on and new connections
    /// are refused, while the connections already open keep being served for `grace` (time for
    /// the load balancer to notice). [`Relay::shutdown`] then closes them.
    pub async fn drain(&self, grace: Duration) {
        self.draining.cancel();
        tracing::info!(?grace, "draining: not ready, refusing new connections");
        tokio::time::sleep(grace).await;
    }

    /// Stops accepting, closes every WebSocket with 1001, and waits (boundedly) for them to go.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.metrics.connections.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

/// Every accepted connection gets `TCP_NODELAY`. The relay writes many small frames (`joined`,
/// presence, events) and a client often has nothing to send back: with Nagle's algorithm on, a
/// frame written while the previous one is still unacknowledged waits for the client's delayed
/// ACK (tens of milliseconds on Linux), so clients that connect and join crawled along while
/// every process sat idle.
fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream: &mut tokio::net::TcpStream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY on a connection");
        }
    })
}

fn build_pool(db: &crate::db::Database, size: usize, timeout: Duration) -> anyhow::Result<Pool> {
    let manager = db.manager(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building the connection pool")
}

/// The database's secret, which seals positions and signs presence messages (see
/// `pgrelay.secrets`).
async fn load_secret(pool: &Pool) -> anyhow::Result<[u8; 32]> {
    let client = pool.get().await.context("connecting to the database")?;
    let row = client
        .query_one("SELECT position_key FROM pgrelay.secrets", &[])
        .await
        .context(
            "reading pgrelay.secrets (is the library installed, and may this role read it?)",
        )?;
    let key: Vec<u8> = row.try_get(0)?;
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| anyhow::anyhow!("pgrelay.secrets.position_key must be 32 bytes"))?;
    Ok(key)
}

/// Ready when the LISTEN connection is up and the last outbox read succeeded.
async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if app.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining".to_string(),
        );
    }
    let listening = app.metrics.listener_connected.get() == 1;
    let reading = app.metrics.reader_healthy.get() == 1;
    if listening && reading {
        (StatusCode::OK, "ready".to_string())
    } else {
        let why = format!("not ready: listening={listening} reading={reading}");
        (StatusCode::SERVICE_UNAVAILABLE, why)
    }
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut listener = without_nagle(listener);
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (stream, _) = listener.accept().await;
        assert!(stream.nodelay().expect("nodelay"), "TCP_NODELAY is set");
        client.await.expect("client").expect("connect");
    }
}
