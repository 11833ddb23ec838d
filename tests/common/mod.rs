//! Test harness: a real PostgreSQL, a real relay, real WebSocket clients.
//!
//! Each test binary starts one throwaway cluster (from the machine's Postgres binaries, via the
//! same embedded module `pgrelay serve` uses) and migrates a template database once, with the
//! demo data (`migrations/demo/seed.sql`: users u1..u4, projects 1 and 2, tasks 1..4). Every test
//! then gets its own database cloned from the template and its own relay, so tests run in
//! parallel without seeing each other.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay::config::RelayConfig;
use pgrelay::db::embedded::EmbeddedPostgres;
use pgrelay::db::migrate;
use pgrelay::jwt::{self, Verifier};
use pgrelay::server::Relay;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &[u8] = b"test-secret";
const TEMPLATE: &str = "pgrelay_template";

/// How long a test waits for a frame it expects.
pub const WAIT: Duration = Duration::from_secs(10);

static CLUSTER: OnceLock<std::sync::Mutex<EmbeddedPostgres>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

fn cluster() -> std::sync::MutexGuard<'static, EmbeddedPostgres> {
    let cluster = CLUSTER.get_or_init(|| {
        // The system temp dir: the server may run as `postgres`, which must be able to reach it.
        let root = std::env::temp_dir().join("pgrelay-tests");
        remove_stale_clusters(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        let pg = EmbeddedPostgres::start(&dir).expect("start the test cluster");
        let admin = pg.url("postgres");
        let template = pg.url(TEMPLATE);
        // Migrating needs an async runtime; this runs once, before any test's runtime uses it.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                execute(&admin, &format!("CREATE DATABASE {TEMPLATE}")).await;
                // Twice: installing over an installed library must be harmless.
                migrate::migrate(&template, false).await.expect("migrate");
                migrate::migrate(&template, false)
                    .await
                    .expect("migrate again");
                migrate::load_demo_data(&template).await.expect("demo data");
            });
        })
        .join()
        .expect("template setup");
        std::sync::Mutex::new(pg)
    });
    cluster
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Connection string for a database of this binary's cluster.
pub async fn cluster_url(database: &str) -> String {
    let database = database.to_owned();
    tokio::task::spawn_blocking(move || cluster().url(&database))
        .await
        .expect("cluster")
}

/// The data directory of this binary's cluster (to configure it, as tests/tls.rs does).
pub async fn cluster_data_dir() -> PathBuf {
    tokio::task::spawn_blocking(|| cluster().data_dir().to_owned())
        .await
        .expect("cluster")
}

/// Stops this binary's cluster (every test in the binary loses its database until it restarts).
pub async fn stop_cluster() {
    tokio::task::spawn_blocking(|| cluster().stop())
        .await
        .expect("stop");
}

pub async fn start_cluster_again() {
    tokio::task::spawn_blocking(|| cluster().start_again().expect("restart"))
        .await
        .expect("start");
}

/// Relay logs in test output (shown for failing tests), filtered by RUST_LOG.
fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "pgrelay=info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Clusters left behind by test runs that were killed (their guardian has already stopped them).
fn remove_stale_clusters(root: &std::path::Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !PathBuf::from("/proc").join(&pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub async fn execute(url: &str, sql: &str) {
    let (client, connection) = pgrelay::db::Database::from_url(url)
        .expect("a valid url")
        .connect()
        .await
        .expect("connect");
    let io = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    drop(client);
    let _ = io.await;
}

/// A fresh database (a copy of the migrated template with demo data).
pub async fn fresh_database() -> String {
    init_logging();
    let name = format!("test_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let create = format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}");
    execute(&cluster_url("postgres").await, &create).await;
    cluster_url(&name).await
}

/// A fresh, empty database (nothing installed).
pub async fn empty_database() -> String {
    init_logging();
    let name = format!("empty_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    execute(
        &cluster_url("postgres").await,
        &format!("CREATE DATABASE {name}"),
    )
    .await;
    cluster_url(&name).await
}

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub db_url: String,
    pub db: tokio_postgres::Client,
}

pub fn config(db_url: &str) -> RelayConfig {
    let mut config = RelayConfig::new(db_url.to_owned(), Verifier::from_secret(SECRET));
    config.bind = "127.0.0.1:0".parse().expect("address");
    config.pool_size = 4;
    config
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        Self::start_on(fresh_database().await, adjust).await
    }

    /// A relay on an existing database (several relays can share one).
    pub async fn start_on(db_url: String, adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let mut config = config(&db_url);
        adjust(&mut config);
        let relay = Relay::start(config).await.expect("relay starts");
        let db = connect(&db_url).await;
        let relay = TestRelay {
            relay: Some(relay),
            db_url,
            db,
        };
        relay.wait_ready().await;
        relay
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.as_ref().expect("running").local_addr()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr())
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.addr());
        for _ in 0..200 {
            if http_get(&url).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("relay never became ready");
    }

    /// Runs SQL in the test database (as one implicit transaction per statement).
    pub async fn sql(&self, sql: &str) {
        self.db
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs SQL that may fail; the error is the database's message.
    pub async fn try_sql(&self, sql: &str) -> Result<(), String> {
        self.db.batch_execute(sql).await.map_err(|e| {
            e.as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned())
        })
    }

    /// Sets task 1's description to `text` followed by `n`: large rows, for tests of slow clients.
    pub async fn describe_task_1(&self, text: &str, n: impl std::fmt::Display) {
        self.db
            .execute(
                "UPDATE tasks SET description = $1 || $2 WHERE id = 1",
                &[&text, &n.to_string()],
            )
            .await
            .expect("update");
    }

    /// A connected, authenticated client of `user`.
    pub async fn client(&self, user: &str) -> WsClient {
        let url = format!("{}?token={}", self.ws_url(), token(user));
        let mut client = WsClient::connect(&url).await.expect("connect");
        let ready = client.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        client
    }

    /// Clients of `users`, each asking to join `room` at once (so their checks share a batch);
    /// returns them and each one's outcome: `joined` or the error code.
    pub async fn join_at_once(&self, users: &[&str], room: &str) -> (Vec<WsClient>, Vec<String>) {
        let mut clients = Vec::new();
        for &user in users {
            let mut client = self.client(user).await;
            client
                .send(json!({"type": "join", "room": room, "ref": user}))
                .await;
            clients.push(client);
        }
        let mut outcomes = Vec::new();
        for client in &mut clients {
            let reply = client.recv().await;
            outcomes.push(if reply["type"] == "joined" {
                "joined".to_owned()
            } else {
                reply["code"].as_str().unwrap_or_default().to_owned()
            });
        }
        (clients, outcomes)
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let (_, body) = http_get(&format!("http://{}/metrics", self.addr())).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("pgrelay_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

/// Waits until a relay of this database sleeps (holds the `SLEEPING` advisory lock on its LISTEN
/// connection, see `pgrelay::capture::wakeup`), then terminates that connection. Returns how many
/// connections it terminated.
pub async fn kill_sleeping_listen_connection(db: &tokio_postgres::Client) -> i64 {
    for _ in 0..400 {
        let killed: i64 = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND classid = $1::int4::oid AND objid = $2::int4::oid AND objsubid = 2",
                &[&pgrelay::capture::wakeup::LOCK_CLASS, &pgrelay::capture::wakeup::SLEEPING],
            )
            .await
            .expect("terminate")
            .get(0);
        if killed > 0 {
            return killed;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    0
}

/// A connection made the way the relay makes them (so TLS settings in the URL apply).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = pgrelay::db::Database::from_url(url)
        .expect("a valid url")
        .connect()
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

pub fn token(user: &str) -> String {
    jwt::mint(SECRET, user, Duration::from_secs(3600), &Map::new()).expect("token")
}

/// An HS256 token with exactly these claims.
pub fn signed(claims: Value, secret: &[u8]) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

/// A token of `user` that expires at `exp` (seconds since the epoch).
pub fn expiring_at(user: &str, exp: u64) -> String {
    signed(json!({"sub": user, "exp": exp}), SECRET)
}

/// Whole seconds since the epoch, as in a token's `exp`.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Seconds since the epoch, with the fraction: to compare with a token's `exp`.
pub fn now_exact() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Asserts that now is within the second after `exp`: a session ends at its token's expiry,
/// never before it (`exp` counts whole seconds, so it may end up to a second after).
pub fn assert_ended_at_expiry(exp: u64) {
    let ended_at = now_exact();
    assert!(
        ended_at >= exp as f64,
        "ended {:.2} s before the token expired",
        exp as f64 - ended_at
    );
    assert!(ended_at <= exp as f64 + 1.5, "ended at expiry, not later");
}

/// Sends SIGTERM to a relay process and returns its exit code once it has exited.
pub async fn terminate(child: &mut tokio::process::Child) -> Option<i32> {
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits")
        .expect("wait")
        .code()
}

/// Creates a `board:N` room kind anyone may join and a `notes` table in `board:1` that exactly the
/// users listed in `readers` (u1 and u2) may read. `watch_options` go to its `pgrelay.watch()`.
pub async fn notes_board(relay: &TestRelay, watch_options: &str) {
    relay
        .sql(&format!(
            "CREATE TABLE readers (user_id text PRIMARY KEY);
             INSERT INTO readers VALUES ('u1'), ('u2');
             CREATE TABLE notes (id int PRIMARY KEY, body text);
             CREATE FUNCTION can_read_note(u text, c jsonb, r jsonb) RETURNS boolean
                 LANGUAGE sql STABLE AS $$ SELECT EXISTS (SELECT FROM readers WHERE user_id = u) $$;
             SELECT pgrelay.watch('notes', ARRAY['board:1'], 'can_read_note'{watch_options});
             CREATE FUNCTION can_join_board(u text, c jsonb, k text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.allow_join('board', 'can_join_board');"
        ))
        .await;
}

/// `exp` as `ready.expires_at` shows it.
pub fn iso(exp: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(exp as i64)
        .expect("timestamp")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// Minimal HTTP/1.1 GET (status, body) without pulling in an HTTP client.
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let Ok(mut stream) = TcpStream::connect(host).await else {
        return (0, String::new());
    };
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Most tests are about changes: they skip presence and typing messages unless they ask.
    pub skip_presence: bool,
    /// The `presence_state` that followed the last `joined`.
    pub presence_state: Option<Value>,
}

fn is_presence(message: &Value) -> bool {
    matches!(
        message["type"].as_str(),
        Some("presence_state" | "presence_diff" | "typing")
    )
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Timeout,
}

impl WsClient {
    pub async fn connect(url: &str) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        // Browsers take messages of any size; tungstenite's client stops at 16 MiB frames,
        // below the largest events the relay sends.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_frame_size(None)
            .max_message_size(None);
        let (stream, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), false).await?;
        Ok(WsClient {
            stream,
            skip_presence: true,
            presence_state: None,
        })
    }

    pub async fn send(&mut self, message: Value) {
        self.stream
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next JSON message; panics after [`WAIT`] or if the connection ends.
    pub async fn recv(&mut self) -> Value {
        loop {
            let message = self.recv_any().await;
            if !(self.skip_presence && is_presence(&message)) {
                return message;
            }
        }
    }

    /// The next JSON message, presence or not.
    pub async fn recv_any(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a message");
            match next {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("JSON"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// The next message that is an event.
    pub async fn recv_event(&mut self) -> Value {
        let message = self.recv().await;
        assert_eq!(message["type"], "event", "expected an event, got {message}");
        message
    }

    /// The next `n` messages, each an event.
    pub async fn recv_events(&mut self, n: usize) -> Vec<Value> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.recv_event().await);
        }
        events
    }

    /// Asserts no message arrives for `quiet` (pings and pongs are answered and ignored).
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.stream.next()).await {
            match next {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text)))
                    if self.skip_presence
                        && serde_json::from_str::<Value>(&text).is_ok_and(|m| is_presence(&m)) =>
                {
                    continue
                }
                Some(message) => panic!("expected nothing, got {message:?}"),
                None => panic!("expected nothing, but the connection ended"),
            }
        }
    }

    /// Joins and returns the `joined` reply (the `presence_state` right behind it is read too).
    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "joined", "joining {room}: {reply}");
        assert_eq!(reply["room"], room);
        let state = self.recv_any().await;
        assert_eq!(state["type"], "presence_state", "after joined: {state}");
        self.presence_state = Some(state);
        reply
    }

    /// Joins with `since` and returns the `joined` reply (replayed events follow it).
    pub async fn join_since(&mut self, room: &str, since: &str) -> Value {
        self.send(json!({"type": "join", "room": room, "since": since}))
            .await;
        let joined = self.recv().await;
        assert_eq!(
            joined["type"], "joined",
            "joining {room} since {since}: {joined}"
        );
        joined
    }

    /// Round trip proving the connection still works and everything before it has been read.
    pub async fn ping(&mut self) {
        self.send(json!({"type": "ping", "ref": "sync"})).await;
        let pong = self.recv().await;
        assert_eq!(pong, json!({"type": "pong", "ref": "sync"}));
    }

    /// Waits for the connection to end and returns its close code.
    pub async fn closed(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next()).await {
                Err(_) => return Ended::Timeout,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Ended::Closed(frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return Ended::Closed(None),
            }
        }
    }
}

pub fn close_code(code: u16) -> Ended {
    Ended::Closed(Some(u16::from(CloseCode::from(code))))
}

/// A minimal Server-Sent Events client over a raw TCP stream.
pub struct SseClient {
    lines: tokio::io::Lines<tokio::io::BufReader<TcpStream>>,
    pub status: u16,
}

/// One SSE message.
#[derive(Debug, Default)]
pub struct SseMessage {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

impl SseClient {
    pub async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let status_line = lines.next_line().await.expect("read").expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // Skip the headers.
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.is_empty() {
                break;
            }
        }
        SseClient { lines, status }
    }

    /// The next message (comments and chunked-encoding size lines are skipped).
    pub async fn next(&mut self) -> SseMessage {
        tokio::time::timeout(WAIT, self.next_or_end())
            .await
            .expect("timed out waiting for an SSE message")
            .expect("the stream ended")
    }

    /// The next message, or `None` once the stream has ended (the relay's last chunk, or the
    /// connection closing).
    pub async fn next_or_end(&mut self) -> Option<SseMessage> {
        let mut message = SseMessage::default();
        loop {
            let line = match self.lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => return None,
            };
            if line == "0" {
                // The zero-length chunk that ends a chunked body (SSE lines never read "0").
                return None;
            }
            if let Some(v) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                message.data.push_str(v);
            } else if let Some(v) = line
                .strip_prefix("id: ")
                .or_else(|| line.strip_prefix("id:"))
            {
                message.id = Some(v.to_owned());
            } else if let Some(v) = line
                .strip_prefix("event: ")
                .or_else(|| line.strip_prefix("event:"))
            {
                message.event = Some(v.to_owned());
            } else if line.is_empty() && !message.data.is_empty() {
                return Some(message);
            }
        }
    }

    /// Waits for the stream to end, reading past whatever it still sends. False if it is still
    /// open after [`WAIT`].
    pub async fn ended(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.next_or_end()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(_)) => continue,
            }
        }
    }

    /// Whether the stream ends (the server closes it) within [`WAIT`], whatever comes before.
    pub async fn ends(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None) | Err(_)) => return true,
            }
        }
    }

    /// The next unnamed message (a change), parsed.
    pub async fn next_event(&mut self) -> (String, Value) {
        loop {
            let message = self.next().await;
            if message.event.is_none() {
                let data: Value = serde_json::from_str(&message.data).expect("JSON data");
                return (message.id.expect("an id"), data);
            }
        }
    }
}

/// Starts `pgrelay serve` as a separate process on `db_url` (so that a test can SIGKILL it), and
/// waits until it is ready. Returns the process and its address.
#[allow(dead_code)]
pub async fn spawn_relay(db_url: &str, extra_args: &[&str]) -> (tokio::process::Child, String) {
    spawn_relay_with(db_url, extra_args, |_| {}).await
}

/// [`spawn_relay`], with the command adjusted before it starts (its environment, where its
/// output goes: by default nowhere).
pub async fn spawn_relay_with(
    db_url: &str,
    extra_args: &[&str],
    adjust: impl FnOnce(&mut tokio::process::Command),
) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command
        .args(["serve", "--bind", &addr])
        .args(extra_args)
        .env("DATABASE_URL", db_url)
        .env(
            "PGRELAY_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("utf8"),
        )
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    adjust(&mut command);
    let child = command.spawn().expect("spawn");
    for _ in 0..200 {
        if http_get(&format!("http://{addr}/readyz")).await.0 == 200 {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the relay did not become ready");
}

/// Sends SIGTERM to a relay started by a test (it drains, then exits).
#[allow(dead_code)]
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the relay is running") as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
}

/// A connected, authenticated client of `user` on the relay at `addr`.
#[allow(dead_code)]
pub async fn client_at(addr: &str, user: &str) -> WsClient {
    let url = format!("ws://{addr}/ws?token={}", token(user));
    let mut client = WsClient::connect(&url).await.expect("connect");
    let ready = client.recv().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    client
}

/// One ```sql block of a Markdown file: the line of its first line in the file, and its text.
pub struct Snippet {
    pub line: usize,
    pub sql: String,
}

pub fn sql_snippets(markdown: &str) -> Vec<Snippet> {
    let mut snippets = Vec::new();
    let mut open: Option<Snippet> = None;
    for (index, line) in markdown.lines().enumerate() {
        let fence = line.trim_start();
        match open.as_mut() {
            None if fence.starts_with("```") => {
                if fence.trim_end() == "```sql" {
                    open = Some(Snippet {
                        line: index + 2,
                        sql: String::new(),
                    });
                } else {
                    // Another kind of block: skip to its end, so that its content is not read.
                    open = Some(Snippet {
                        line: 0,
                        sql: String::new(),
                    });
                }
            }
            None => {}
            Some(_) if fence.trim_end() == "```" => {
                let done = open.take().expect("open block");
                if done.line > 0 {
                    snippets.push(done);
                }
            }
            Some(block) if block.line > 0 => {
                block.sql.push_str(line);
                block.sql.push('\n');
            }
            Some(_) => {}
        }
    }
    assert!(open.is_none(), "a code block is never closed");
    snippets
}
