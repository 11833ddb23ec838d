//! pgrelay's load generator: WebSocket clients and Postgres writers in one light process.
//!
//! It drives a relay that runs as its own process (see `bench/run`), and checks every run:
//! each client counts what it received against what the policies allow it to read, and any event
//! it may not read is a leak. Latency is measured from the writer's `COMMIT` returning to the
//! client reading the frame, on this process's clock: each update writes its sequence number into
//! `tasks.priority`, and the client looks up when that number was committed.
//!
//! ```text
//! cargo bench --bench loadgen -- setup  --db URL [--projects 20 --members 80 --outsiders 20 --tasks 50]
//! cargo bench --bench loadgen -- fanout --db URL --relay ADDR[,ADDR...] [--rooms 20 --clients-per-room 100
//!                                        --writers 8 --rate 0 --seconds 60]
//! cargo bench --bench loadgen -- bulk   --db URL --relay ADDR [--rows 100000]
//! cargo bench --bench loadgen -- joins  --db URL --relay ADDR [--connections 500 --joins 20 --rounds 1]
//! cargo bench --bench loadgen -- idle   --relay ADDR [--connections 20000 --pid RELAY_PID]
//! cargo bench --bench loadgen -- storm  --db URL --relay ADDR --relay-cmd "pgrelay serve ..."
//!                                        [--rooms 20 --clients-per-room 100 --changes 200]
//! cargo bench --bench loadgen -- stall  --db URL --relay ADDR [--users 10 --per-user 18
//!                                        --backlog 20000 --seconds 60]
//! ```
//!
//! Each run prints one JSON line of results. The bench data lives in projects 1000.. and users
//! `b<project>_<n>`: in every project, user 0 owns it, users 1..members are members, the next
//! `outsiders` are not; one task in ten is private to its creator.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

const SECRET: &str = "pgrelay-dev-secret-not-for-production";
const FIRST_PROJECT: i64 = 1000;

struct Args(HashMap<String, String>);

impl Args {
    fn parse(list: &[String]) -> anyhow::Result<Args> {
        let mut map = HashMap::new();
        let mut it = list.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                bail!("unexpected argument {key}");
            };
            let value = it.next().with_context(|| format!("{key} needs a value"))?;
            map.insert(name.to_owned(), value.clone());
        }
        Ok(Args(map))
    }
    fn text(&self, name: &str, default: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    }
    fn num(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => v.parse().with_context(|| format!("--{name} {v}")),
        }
    }
}

/// The shape of the bench data.
#[derive(Clone, Copy)]
struct Shape {
    projects: i64,
    members: i64,
    outsiders: i64,
    tasks: i64,
}

impl Shape {
    fn from(args: &Args) -> anyhow::Result<Shape> {
        Ok(Shape {
            projects: args.num("projects", 20)? as i64,
            members: args.num("members", 80)? as i64,
            outsiders: args.num("outsiders", 20)? as i64,
            tasks: args.num("tasks", 50)? as i64,
        })
    }
    fn user(p: i64, n: i64) -> String {
        format!("b{p}_{n}")
    }
    fn task_id(p: i64, t: i64) -> i64 {
        (FIRST_PROJECT + p) * 100_000 + t
    }
    fn is_private(t: i64) -> bool {
        t % 10 == 0
    }
    /// The member who created task `t` (a private task is readable by its creator and the owner).
    fn creator(&self, t: i64) -> i64 {
        1 + t % (self.members - 1).max(1)
    }
    /// May user `n` of a project read task `t` of the same project?
    fn may_read(&self, n: i64, t: i64) -> bool {
        n < self.members && (!Shape::is_private(t) || n == 0 || n == self.creator(t))
    }
}

async fn db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn setup(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    let client = db(&args.text("db", "")).await?;
    let users_per_project = shape.members + shape.outsiders;
    client
        .batch_execute(&format!(
            "INSERT INTO users (id, name)
               SELECT 'b' || p || '_' || n, 'bench' FROM generate_series(0, {last_p}) p,
                      generate_series(0, {last_n}) n
             ON CONFLICT DO NOTHING;
             INSERT INTO projects (id, name, owner_id)
               SELECT {FIRST_PROJECT} + p, 'bench ' || p, 'b' || p || '_0'
                 FROM generate_series(0, {last_p}) p
             ON CONFLICT DO NOTHING;
             INSERT INTO project_members (project_id, user_id, role)
               SELECT {FIRST_PROJECT} + p, 'b' || p || '_' || n,
                      CASE WHEN n = 0 THEN 'owner' WHEN n % 8 = 7 THEN 'viewer' ELSE 'member' END
                 FROM generate_series(0, {last_p}) p, generate_series(0, {last_member}) n
             ON CONFLICT DO NOTHING;
             INSERT INTO tasks (id, project_id, title, is_private, created_by, priority)
               SELECT ({FIRST_PROJECT} + p) * 100000 + t, {FIRST_PROJECT} + p, 'bench task ' || t,
                      t % 10 = 0, 'b' || p || '_' || (1 + t % greatest({members} - 1, 1)), 0
                 FROM generate_series(0, {last_p}) p, generate_series(0, {last_t}) t
             ON CONFLICT DO NOTHING;
             ANALYZE;",
            last_p = shape.projects - 1,
            last_n = users_per_project - 1,
            last_member = shape.members - 1,
            members = shape.members,
            last_t = shape.tasks - 1,
        ))
        .await
        .context("creating the bench data")?;
    Ok(
        json!({"setup": "ok", "projects": shape.projects, "users": shape.projects * users_per_project}),
    )
}

fn token(user: &str) -> anyhow::Result<String> {
    pgrelay::jwt::mint(
        SECRET.as_bytes(),
        user,
        Duration::from_secs(3600),
        &Map::new(),
    )
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from one of many loopback source addresses (one address has only ~28k ports).
async fn connect(relay: SocketAddr, user: &str, n: usize) -> anyhow::Result<Ws> {
    let source = Ipv4Addr::new(127, 0, 1 + (n / 20_000) as u8, 1 + (n % 250) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    // Bounded, so that a relay that stops accepting (say, out of file descriptors: the accept
    // backlog still completes TCP handshakes) fails the run instead of hanging it.
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(relay))
        .await
        .context("TCP connect timed out")?
        .context("TCP connect")?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{relay}/ws?token={}", token(user)?);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        // tungstenite zero-fills its whole read buffer (128 KiB by default) before every read;
        // with W2's thousands of small reads that memset was 37% of the generator's CPU.
        tokio_tungstenite::client_async_with_config(url, stream, Some(client_config())),
    )
    .await
    .context("WebSocket handshake timed out (is the relay out of file descriptors?)")?
    .context("WebSocket handshake")?;
    let ready = next_json(&mut ws).await?;
    anyhow::ensure!(ready["type"] == "ready", "expected ready, got {ready}");
    Ok(ws)
}

fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// The next text frame (30 s at most).
async fn next_text(ws: &mut Ws) -> anyhow::Result<Utf8Bytes> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("timed out")?
            .context("connection ended")??;
        if let Message::Text(text) = message {
            return Ok(text);
        }
    }
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&next_text(ws).await?)?)
}

/// The next frame that is not presence, parsed. Presence makes most of W6's frames (each join
/// shows the joiner to everyone in the room), and parsing them all made the generator the
/// heaviest process of the run.
async fn next_reply(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let text = next_text(ws).await?;
        if memchr::memmem::find(text.as_bytes(), b"\"type\":\"presence_").is_none() {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

/// Joins a room and reads up to its `joined` (or the refusal).
async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<bool> {
    ws.send(Message::Text(
        json!({"type": "join", "room": room}).to_string().into(),
    ))
    .await?;
    loop {
        let reply = next_json(ws).await?;
        match reply["type"].as_str() {
            Some("joined") => return Ok(true),
            Some("error") if reply["code"] == "forbidden" => return Ok(false),
            Some("error") => bail!("joining {room}: {reply}"),
            _ => {} // presence
        }
    }
}

/// The raw text of a flat JSON field (`"key":value`), without parsing the whole event.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let start = text.find(&pattern)? + pattern.len();
    value_at(text, start)
}

/// The raw value that starts at `start` and ends at the next `,` or `}` (flat fields only).
fn value_at(text: &str, start: usize) -> Option<&str> {
    let rest = text.get(start..)?;
    let end = memchr::memchr2(b',', b'}', rest.as_bytes()).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"'))
}

/// What the fan-out workloads read of each event: the task's id and its `priority` (the
/// writer's sequence number), found by searchers built once. W2 reads 200,000 frames a second
/// on the cores the relay and Postgres need, so a search set up per field per frame (`field`)
/// was a tenth of the generator's CPU.
struct EventScan {
    row: memchr::memmem::Finder<'static>,
    id: memchr::memmem::Finder<'static>,
    priority: memchr::memmem::Finder<'static>,
}

impl EventScan {
    fn new() -> EventScan {
        EventScan {
            row: memchr::memmem::Finder::new(b"\"row\":"),
            id: memchr::memmem::Finder::new(b"\"id\":"),
            priority: memchr::memmem::Finder::new(b"\"priority\":"),
        }
    }

    /// `(task id, priority)` of an event frame; `None` for any other message. The relay writes
    /// `type` first, so other messages are told apart without a search.
    fn scan<'a>(&self, text: &'a str) -> Option<(Option<&'a str>, Option<&'a str>)> {
        if !text.starts_with("{\"type\":\"event\"") {
            return None;
        }
        // Look only inside the row (`old`, and the event's own `id`, come before it).
        let row = self
            .row
            .find(text.as_bytes())
            .map_or("", |i| &text[i + 6..]);
        let after = |finder: &memchr::memmem::Finder, len: usize| {
            finder
                .find(row.as_bytes())
                .and_then(|i| value_at(row, i + len))
        };
        Some((after(&self.id, 5), after(&self.priority, 11)))
    }
}

/// When each sequence number was committed, in nanoseconds since the run started.
struct Commits {
    start: Instant,
    at: Vec<AtomicU64>,
    /// Sequence number n is written as `base + n`, `base` being the highest priority a bench task
    /// had before the run. Numbers must not repeat across runs on one database: an UPDATE that
    /// sets the value a row already has changes nothing, so it is (rightly) not an event, and
    /// runs that started from 1 each time counted those as lost (35 a run from the second W1 on).
    base: usize,
}

impl Commits {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    /// When the writers started (set once, before the first write).
    fn first_write(&self) -> u64 {
        self.at[0].load(Ordering::Relaxed)
    }
}

/// What the writer stores for sequence number `n` (`tasks.priority` is an `int`).
fn sequence_number(commits: &Commits, n: usize) -> anyhow::Result<i32> {
    i32::try_from(commits.base + n).context(
        "sequence numbers no longer fit tasks.priority: \
         UPDATE tasks SET priority = 0 WHERE project_id >= 1000",
    )
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    events: u64,
    leaked: u64,
    latencies_us: Vec<u32>,
    /// The second of the run (since the first write) each latency's change was committed in.
    committed_second: Vec<u16>,
}

async fn read_events(
    mut ws: Ws,
    project: i64,
    n: i64,
    shape: Shape,
    commits: Arc<Commits>,
    quiet: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> Seen {
    let mut seen = Seen::default();
    let scan = EventScan::new();
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            () = stop.cancelled() => break,
        };
        let Some(Ok(Message::Text(text))) = message else {
            if matches!(message, Some(Ok(_))) {
                continue;
            }
            eprintln!("client b{project}_{n}: connection ended: {message:?}");
            break;
        };
        let Some((task, priority)) = scan.scan(&text) else {
            continue;
        };
        let now = commits.now();
        quiet.store(now, Ordering::Relaxed);
        seen.events += 1;
        let task: i64 = task.and_then(|v| v.parse().ok()).unwrap_or(-1);
        let t = task - Shape::task_id(project, 0);
        if !(0..shape.tasks).contains(&t) || !shape.may_read(n, t) {
            seen.leaked += 1;
        }
        let seq: usize = priority
            .and_then(|v| v.parse::<usize>().ok())
            .and_then(|v| v.checked_sub(commits.base))
            .unwrap_or(0);
        if let Some(committed) = commits.at.get(seq).map(|a| a.load(Ordering::Relaxed)) {
            if seq > 0 && committed > 0 {
                seen.latencies_us
                    .push((now.saturating_sub(committed) / 1000) as u32);
                seen.committed_second
                    .push((committed.saturating_sub(commits.first_write()) / 1_000_000_000) as u16);
            }
        }
    }
    seen
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// W1, W2, W4: clients in project rooms; writers update random tasks of those projects.
async fn fanout(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    // Several relays (bench/replica-cost.sh): clients are dealt out to them in turn.
    let relays: Vec<SocketAddr> = args
        .text("relay", "127.0.0.1:8080")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rooms = args.num("rooms", shape.projects as u64)? as i64;
    let per_room = args.num("clients-per-room", 100)? as i64;
    let writers = args.num("writers", 8)? as usize;
    let rate = args.num("rate", 0)?; // total updates per second; 0 = as fast as possible
    let seconds = args.num("seconds", 60)?;
    // Writes before the measured seconds: a relay that just started knows no policy answers yet,
    // and its first reads ask them all (reported apart, as `warmup`).
    let warmup = args.num("warmup", 0)?;
    let db_url = args.text("db", "");

    let base: i32 = db(&db_url)
        .await?
        .query_one(
            "SELECT coalesce(max(priority), 0) FROM tasks WHERE project_id >= $1",
            &[&FIRST_PROJECT],
        )
        .await?
        .get(0);
    let commits = Arc::new(Commits {
        start: Instant::now(),
        at: (0..2_000_000).map(|_| AtomicU64::new(0)).collect(),
        base: usize::try_from(base).unwrap_or(0),
    });
    let quiet = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();

    // Connect and join, a few at a time.
    let mut clients = Vec::new();
    let connected = Instant::now();
    let mut k = 0usize;
    for p in 0..rooms {
        for n in 0..per_room.min(shape.members + shape.outsiders) {
            let user = Shape::user(p, n);
            let mut ws = connect(relays[k % relays.len()], &user, k).await?;
            k += 1;
            let room = format!("project:{}", FIRST_PROJECT + p);
            let allowed = join(&mut ws, &room).await?;
            anyhow::ensure!(
                allowed == (n < shape.members),
                "{user} joining {room}: {allowed}"
            );
            if !allowed {
                // Outsiders stay connected in their own room: they must receive nothing.
                anyhow::ensure!(join(&mut ws, &format!("user:{user}")).await?);
            }
            clients.push(((p, n), ws));
        }
    }
    let connect_seconds = connected.elapsed().as_secs_f64();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|((p, n), ws)| {
            let task = read_events(
                ws,
                p,
                n,
                shape,
                commits.clone(),
                quiet.clone(),
                stop.clone(),
            );
            ((p, n), tokio::spawn(task))
        })
        .collect();

    // Writers: each commits `rows` updates per transaction (one statement), numbering them.
    let rows = args.num("rows-per-commit", 1)?.max(1) as usize;
    let seq = Arc::new(AtomicUsize::new(1));
    let updates: Arc<Mutex<Vec<u64>>> =
        Arc::new(Mutex::new(vec![0; (rooms * shape.tasks) as usize]));
    let deadline = Instant::now() + Duration::from_secs(warmup + seconds);
    let started = commits.now();
    commits.at[0].store(started, Ordering::Relaxed); // sequence numbers start at 1
    let mut handles = Vec::new();
    for w in 0..writers {
        let client = db(&db_url).await?;
        let statement = if rows == 1 {
            client
                .prepare("UPDATE tasks SET priority = $1 WHERE id = $2")
                .await?
        } else {
            client
                .prepare(
                    "UPDATE tasks SET priority = v.seq \
                     FROM unnest($1::int[], $2::bigint[]) AS v(seq, id) WHERE tasks.id = v.id",
                )
                .await?
        };
        let (commits, seq, updates) = (commits.clone(), seq.clone(), updates.clone());
        let gap =
            (rate > 0).then(|| Duration::from_secs_f64((writers * rows) as f64 / rate as f64));
        handles.push(tokio::spawn(async move {
            let mut rng = w as u64 * 7919 + 1;
            let mut next = Instant::now();
            let mut lags = Vec::new();
            let mut picked: Vec<(i64, i64)> = Vec::with_capacity(rows);
            while Instant::now() < deadline {
                if let Some(gap) = gap {
                    next += gap;
                    tokio::time::sleep_until(next.into()).await;
                }
                // `rows` different tasks (a statement updates each row once).
                picked.clear();
                while picked.len() < rows {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let p = (rng % rooms as u64) as i64;
                    let t = ((rng >> 20) % shape.tasks as u64) as i64;
                    if !picked.contains(&(p, t)) {
                        picked.push((p, t));
                    }
                }
                let first = seq.fetch_add(rows, Ordering::Relaxed);
                let began = Instant::now();
                if rows == 1 {
                    let (p, t) = picked[0];
                    client
                        .execute(
                            &statement,
                            &[&sequence_number(&commits, first)?, &Shape::task_id(p, t)],
                        )
                        .await?;
                } else {
                    // In id order, so that writers lock rows in one order; a deadlock that
                    // still happens rolls its transaction back: nothing was committed, so
                    // nothing is expected.
                    picked.sort_unstable_by_key(|&(p, t)| Shape::task_id(p, t));
                    let seqs: Vec<i32> = (first..first + rows)
                        .map(|n| sequence_number(&commits, n))
                        .collect::<anyhow::Result<_>>()?;
                    let ids: Vec<i64> = picked.iter().map(|&(p, t)| Shape::task_id(p, t)).collect();
                    match client.execute(&statement, &[&seqs, &ids]).await {
                        Ok(_) => {}
                        Err(err)
                            if err.code()
                                == Some(
                                    &tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED,
                                ) =>
                        {
                            continue;
                        }
                        Err(err) => return Err(err.into()),
                    }
                }
                lags.push(began.elapsed().as_micros() as u32);
                let now = commits.now();
                for n in first..first + rows {
                    if let Some(at) = commits.at.get(n) {
                        at.store(now, Ordering::Relaxed);
                    }
                }
                if let Ok(mut updates) = updates.lock() {
                    for &(p, t) in &picked {
                        updates[(p * shape.tasks + t) as usize] += 1;
                    }
                }
            }
            anyhow::Ok(lags)
        }));
    }
    let mut commit_us = Vec::new();
    for handle in handles {
        commit_us.extend(handle.await??);
    }
    let written = commits.now();
    let written_seconds = (written - started) as f64 / 1e9;
    // Wait until deliveries stop (nothing for 2 s, or 60 s at most), then count. A relay that
    // fell behind shows as `missing_at_end`: late, not necessarily lost.
    let drained = Instant::now();
    while drained.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if commits.now().saturating_sub(quiet.load(Ordering::Relaxed)) > 2_000_000_000 {
            break;
        }
    }
    stop.cancel();
    let updates = updates.lock().map(|u| u.clone()).unwrap_or_default();
    let (mut delivered, mut expected, mut lost, mut leaked, mut extra) = (0, 0, 0, 0, 0);
    let mut by_second: Vec<Vec<u32>> = Vec::new();
    for ((p, n), reader) in readers {
        let seen = reader.await?;
        let should: u64 = (0..shape.tasks)
            .filter(|t| shape.may_read(n, *t))
            .map(|t| updates[(p * shape.tasks + t) as usize])
            .sum();
        delivered += seen.events;
        expected += should;
        lost += should.saturating_sub(seen.events);
        extra += seen.events.saturating_sub(should);
        leaked += seen.leaked;
        for (latency, second) in seen.latencies_us.iter().zip(&seen.committed_second) {
            let second = *second as usize;
            if by_second.len() <= second {
                by_second.resize_with(second + 1, Vec::new);
            }
            by_second[second].push(*latency);
        }
    }
    // The measured part: changes committed after the warm-up.
    let warm = warmup as usize;
    let mut cold: Vec<u32> = by_second.iter().take(warm).flatten().copied().collect();
    cold.sort_unstable();
    let mut latencies: Vec<u32> = by_second.iter().skip(warm).flatten().copied().collect();
    latencies.sort_unstable();
    let measured_from = started + warmup * 1_000_000_000;
    let measured_seconds =
        (quiet.load(Ordering::Relaxed).max(written) - measured_from) as f64 / 1e9;
    // Where the tail comes from: p99 of the changes committed in each second of the run.
    let p99_by_second: Vec<f64> = by_second
        .iter_mut()
        .map(|l| {
            l.sort_unstable();
            (percentile(l, 0.99) * 10.0).round() / 10.0
        })
        .collect();
    commit_us.sort_unstable();
    let changes = commit_us.len() * rows;
    Ok(json!({
        "workload": "fanout",
        "rows_per_commit": rows,
        "clients": rooms * per_room,
        "rooms": rooms,
        "writers": writers,
        "connect_seconds": connect_seconds,
        "changes": changes,
        "changes_per_s": changes as f64 / written_seconds,
        "deliveries": delivered,
        "expected": expected,
        // Over the time it took to deliver them, from the end of the warm-up to the last event
        // received: a relay that falls behind and catches up later gets no credit.
        "deliveries_per_s": (delivered - cold.len() as u64) as f64 / measured_seconds,
        "warmup": {"seconds": warmup, "deliveries": cold.len(), "latency_p99_ms": percentile(&cold, 0.99)},
        "missing_at_end": lost,
        "duplicated_or_extra": extra,
        "leaked": leaked,
        "latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": percentile(&latencies, 1.0)},
        "commit_ms": {"p50": percentile(&commit_us, 0.5), "p99": percentile(&commit_us, 0.99)},
        "latency_p99_ms_by_second": p99_by_second,
    }))
}

/// W5: one UPDATE of many tasks, one subscriber (the owner, who may read them all).
async fn bulk(args: &Args) -> anyhow::Result<Value> {
    let relay: SocketAddr = args.text("relay", "127.0.0.1:8080").parse()?;
    let rows = args.num("rows", 100_000)? as i64;
    let client = db(&args.text("db", "")).await?;
    let project = FIRST_PROJECT + 999;
    let owner = "b999_0";
    client
        .batch_execute(&format!(
            "INSERT INTO users VALUES ('{owner}', 'bulk') ON CONFLICT DO NOTHING;
             INSERT INTO projects (id, name, owner_id) VALUES ({project}, 'bulk', '{owner}')
               ON CONFLICT DO NOTHING;
             INSERT INTO project_members VALUES ({project}, '{owner}', 'owner') ON CONFLICT DO NOTHING;
             INSERT INTO tasks (id, project_id, title, priority)
               SELECT {project} * 100000 + t, {project}, 'bulk ' || t, 0
                 FROM generate_series(0, {last}) t ON CONFLICT DO NOTHING;
             ANALYZE tasks;",
            last = rows - 1
        ))
        .await?;
    let room = format!("project:{project}");
    let mut ws = connect(relay, owner, 0).await?;
    anyhow::ensure!(join(&mut ws, &room).await?);
    let began = Instant::now();
    let updated = client
        .execute(
            "UPDATE tasks SET priority = priority + 1 WHERE project_id = $1",
            &[&project],
        )
        .await?;
    let committed = began.elapsed();
    let mut received = 0u64;
    let mut first = None;
    let mut last_id = String::new();
    let mut resumes = 0;
    while received < updated {
        let message = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .context("timed out waiting for the bulk events")?
            .context("connection ended")??;
        match message {
            Message::Text(text) if field(&text, "type") == Some("event") => {
                received += 1;
                first.get_or_insert_with(|| began.elapsed());
                last_id = field(&text, "id").unwrap_or_default().to_owned();
            }
            // Too slow (4008): what a client does, resume from the last event it got.
            Message::Close(Some(frame)) if u16::from(frame.code) == 4008 && resumes < 10 => {
                resumes += 1;
                ws = connect(relay, owner, 0).await?;
                ws.send(Message::Text(
                    json!({"type": "join", "room": room, "since": last_id})
                        .to_string()
                        .into(),
                ))
                .await?;
            }
            Message::Close(frame) => bail!("closed: {frame:?}"),
            _ => {}
        }
    }
    let all = began.elapsed();
    Ok(json!({
        "workload": "bulk",
        "rows": updated,
        "commit_s": committed.as_secs_f64(),
        "first_event_s": first.map(|d| d.as_secs_f64()),
        "all_delivered_s": all.as_secs_f64(),
        "after_commit_s": (all - committed).as_secs_f64(),
        "resumes_after_4008": resumes,
    }))
}

/// W6: authorized joins per second (each join asks the join policy).
///
/// Every connection pipelines its joins, and a round is timed from the first send to the last
/// reply. One round of 10,000 joins takes about two seconds, too short to call on a noisy
/// machine, so `--rounds` repeats it: between rounds every connection leaves its rooms and
/// rests until the relay's per-connection limits (joins and messages per second) have refilled,
/// so each round is the same burst and none is throttled.
async fn joins(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    let relay: SocketAddr = args.text("relay", "127.0.0.1:8080").parse()?;
    let connections = args.num("connections", 500)? as usize;
    let per_connection = args.num("joins", 20)? as usize;
    let rounds = args.num("rounds", 1)?.max(1);
    let mut sockets = Vec::new();
    for k in 0..connections {
        let p = (k as i64) % shape.projects;
        let n = 1 + (k as i64 / shape.projects) % (shape.members - 1);
        sockets.push((p, connect(relay, &Shape::user(p, n), k).await?));
    }
    let rooms = move |p: i64| -> Vec<String> {
        (0..per_connection as i64)
            .map(|t| format!("task:{}", Shape::task_id(p, 1 + t % (shape.tasks - 1))))
            .collect()
    };
    let (mut joined, mut refused, mut timed) = (0u64, 0u64, Duration::ZERO);
    let mut per_round = Vec::new();
    for round in 0..rounds {
        if round > 0 {
            // Leave, then rest: 20 joins and 20 leaves use the burst of both limits (see
            // `Limits` in src/config.rs), which refill in two seconds.
            sockets = exchange_all(sockets, "leave", "left", rooms).await?.0;
            tokio::time::sleep(Duration::from_millis(2200)).await;
        }
        let began = Instant::now();
        let (back, (j, r)) = exchange_all(sockets, "join", "joined", rooms).await?;
        let seconds = began.elapsed();
        sockets = back;
        joined += j;
        refused += r;
        timed += seconds;
        per_round.push(j as f64 / seconds.as_secs_f64());
    }
    let mut sorted = per_round.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "workload": "joins",
        "connections": connections,
        "joins": joined,
        "refused": refused,
        "seconds": timed.as_secs_f64(),
        "joins_per_s": joined as f64 / timed.as_secs_f64(),
        "rounds": rounds,
        "joins_per_s_by_round": per_round.iter().map(|r| r.round()).collect::<Vec<_>>(),
        "joins_per_s_median": sorted[sorted.len() / 2],
    }))
}

/// Every connection sends `kind` for each of its rooms at once, then reads until each has been
/// answered (`ok`) or refused (`error`). Returns the connections and the (answered, refused)
/// counts.
async fn exchange_all(
    sockets: Vec<(i64, Ws)>,
    kind: &'static str,
    ok: &'static str,
    rooms: impl Fn(i64) -> Vec<String>,
) -> anyhow::Result<(Vec<(i64, Ws)>, (u64, u64))> {
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|(p, mut ws)| {
            let rooms = rooms(p);
            tokio::spawn(async move {
                for room in &rooms {
                    ws.send(Message::Text(
                        json!({"type": kind, "room": room}).to_string().into(),
                    ))
                    .await?;
                }
                let (mut answered, mut refused) = (0u64, 0u64);
                while answered + refused < rooms.len() as u64 {
                    let reply = next_reply(&mut ws).await?;
                    match reply["type"].as_str() {
                        Some(t) if t == ok => answered += 1,
                        Some("error") => refused += 1,
                        _ => {}
                    }
                }
                anyhow::Ok((p, ws, answered, refused))
            })
        })
        .collect();
    let (mut answered, mut refused, mut back) = (0, 0, Vec::new());
    for task in tasks {
        let (p, ws, a, r) = task.await??;
        answered += a;
        refused += r;
        back.push((p, ws));
    }
    Ok((back, (answered, refused)))
}

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// W3: idle authenticated connections, each joined to two rooms; the relay's memory per connection.
async fn idle(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    let relay: SocketAddr = args.text("relay", "127.0.0.1:8080").parse()?;
    let connections = args.num("connections", 20_000)? as usize;
    let pid = args.text("pid", "");
    let before = rss_kib(&pid)?;
    let began = Instant::now();
    let mut held = Vec::with_capacity(connections);
    for k in 0..connections {
        let p = (k as i64) % shape.projects;
        let n = (k as i64 / shape.projects) % shape.members;
        let user = Shape::user(p, n);
        let mut ws = connect(relay, &user, k)
            .await
            .with_context(|| format!("connection {k}"))?;
        // Rooms of a few dozen people (a task each), as idle browser tabs would sit in; a room of
        // thousands makes every join a presence diff to thousands.
        let t = 1 + (k as i64 / shape.projects / shape.members) % 9;
        anyhow::ensure!(join(&mut ws, &format!("task:{}", Shape::task_id(p, t))).await?);
        anyhow::ensure!(join(&mut ws, &format!("user:{user}")).await?);
        // An idle client still reads (presence diffs, pings), as a browser would.
        held.push(tokio::spawn(async move {
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    let seconds = began.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(&pid)?;
    Ok(json!({
        "workload": "idle",
        "connections": held.len(),
        "connect_seconds": seconds,
        "relay_rss_before_mib": before as f64 / 1024.0,
        "relay_rss_after_mib": after as f64 / 1024.0,
        "kib_per_connection": (after.saturating_sub(before)) as f64 / held.len() as f64,
    }))
}

/// CPU time this process used (user + system), so runs can show what the generator itself cost.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Starts the relay with `command` (run by `sh -c`, `exec`ed so the child is the relay) and
/// waits until it is ready.
async fn start_relay(command: &str, relay: SocketAddr) -> anyhow::Result<tokio::process::Child> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", &format!("exec {command}")])
        .kill_on_drop(true)
        .spawn()
        .context("starting the relay")?;
    for _ in 0..400 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(relay).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request =
                format!("GET /readyz HTTP/1.1\r\nHost: {relay}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response).await;
            if response.starts_with("HTTP/1.1 200") {
                return Ok(child);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the relay did not become ready")
}

/// One of the relay's counters (from /metrics).
async fn relay_metric(relay: SocketAddr, name: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(relay).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {relay}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    response
        .lines()
        .find_map(|l| l.strip_prefix(&format!("pgrelay_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("metric {name}"))
}

/// W8: a reconnect storm. Clients in project rooms receive one change each, the relay is
/// SIGKILLed, `--changes` changes per room commit while it is down, it restarts, and every
/// client resumes with its last id at once. Each must receive exactly the changes it may read,
/// once, in order; the result is how long after the restart the last one had them all.
async fn storm(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    let relay: SocketAddr = args.text("relay", "127.0.0.1:8080").parse()?;
    let command = args.text("relay-cmd", "");
    anyhow::ensure!(!command.is_empty(), "--relay-cmd: how to start the relay");
    let rooms = args.num("rooms", 20)? as i64;
    let per_room = args.num("clients-per-room", 100)? as i64;
    let changes = args.num("changes", 200)? as i64;
    let db_url = args.text("db", "");
    let db = db(&db_url).await?;
    let base: i32 = db
        .query_one(
            "SELECT coalesce(max(priority), 0) FROM tasks WHERE project_id >= $1",
            &[&FIRST_PROJECT],
        )
        .await?
        .get(0);
    let mut child = start_relay(&command, relay).await?;

    // Connect and join; then one change per room gives every client an event id.
    let mut clients = Vec::new();
    for p in 0..rooms {
        for i in 0..per_room {
            let n = i % shape.members;
            let mut ws = connect(relay, &Shape::user(p, n), clients.len()).await?;
            anyhow::ensure!(join(&mut ws, &format!("project:{}", FIRST_PROJECT + p)).await?);
            clients.push((p, n, ws));
        }
    }
    let first = base + 1;
    for p in 0..rooms {
        // Task 1 is public: everyone in the room may read it.
        db.execute(
            "UPDATE tasks SET priority = $1 WHERE id = $2",
            &[&(first + p as i32), &Shape::task_id(p, 1)],
        )
        .await?;
    }
    let mut positions = Vec::new();
    for (p, n, mut ws) in clients {
        let id = loop {
            let text = next_text(&mut ws).await?;
            if text.starts_with("{\"type\":\"event\"") {
                break field(&text, "id").context("an event id")?.to_owned();
            }
        };
        positions.push((p, n, id));
    }

    child.start_kill().context("SIGKILL")?;
    child.wait().await?;
    let killed = Instant::now();
    // While it is down: `changes` per room, each room's in order, to tasks 0..tasks.
    let mut expected: HashMap<(i64, i64), Vec<i32>> = HashMap::new();
    let seq0 = first + rooms as i32;
    let mut writers = Vec::new();
    for p in 0..rooms {
        let url = db_url.clone();
        writers.push(tokio::spawn(async move {
            let db = self::db(&url).await?;
            let mut written = Vec::new();
            for k in 0..changes {
                let seq = seq0 + (p * changes + k) as i32;
                let t = k % shape.tasks;
                db.execute(
                    "UPDATE tasks SET priority = $1 WHERE id = $2",
                    &[&seq, &Shape::task_id(p, t)],
                )
                .await?;
                written.push((t, seq));
            }
            anyhow::Ok((p, written))
        }));
    }
    for writer in writers {
        let (p, written) = writer.await??;
        for n in 0..shape.members {
            let mine = written
                .iter()
                .filter(|(t, _)| shape.may_read(n, *t))
                .map(|(_, seq)| *seq)
                .collect();
            expected.insert((p, n), mine);
        }
    }
    let down_s = killed.elapsed().as_secs_f64();

    let restarted = Instant::now();
    let child = start_relay(&command, relay).await?;
    let ready_s = restarted.elapsed().as_secs_f64();
    let expected = Arc::new(expected);
    let resumers: Vec<_> = positions
        .into_iter()
        .enumerate()
        .map(|(k, (p, n, since))| {
            let expected = expected.clone();
            tokio::spawn(async move {
                let want = expected.get(&(p, n)).cloned().unwrap_or_default();
                let outcome = resume_one(relay, p, n, k, &since, &want).await;
                (outcome, restarted.elapsed())
            })
        })
        .collect();
    let (mut lost, mut repeated, mut failed, mut done) = (0u64, 0u64, 0u64, Vec::new());
    for resumer in resumers {
        let (outcome, at) = resumer.await?;
        match outcome {
            Ok(Resumed { missing, repeats }) => {
                lost += missing;
                repeated += repeats;
                done.push(at.as_secs_f64());
            }
            Err(err) => {
                eprintln!("a resume failed: {err:#}");
                failed += 1;
            }
        }
    }
    done.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        done.get(((done.len().max(1) - 1) as f64 * q) as usize)
            .copied()
    };
    let replay_read = relay_metric(relay, "replay_changes_read_total").await?;
    let replay_failures = relay_metric(relay, "replay_failures_total").await?;
    drop(child);
    Ok(json!({
        "workload": "storm",
        "clients": rooms * per_room,
        "rooms": rooms,
        "changes_per_room": changes,
        "relay_down_s": down_s,
        "restart_to_ready_s": ready_s,
        "all_caught_up_s": quantile(1.0),
        "median_caught_up_s": quantile(0.5),
        "lost": lost,
        "repeated": repeated,
        "failed_resumes": failed,
        "relay_replay_failures": replay_failures,
        "relay_replay_changes_read": replay_read,
    }))
}

struct Resumed {
    missing: u64,
    repeats: u64,
}

/// Reconnects (retrying while the relay starts to accept), joins with `since` and reads until it
/// has every sequence number in `want`; anything else it receives counts as repeated.
async fn resume_one(
    relay: SocketAddr,
    p: i64,
    n: i64,
    k: usize,
    since: &str,
    want: &[i32],
) -> anyhow::Result<Resumed> {
    let mut ws = connect(relay, &Shape::user(p, n), k).await?;
    let room = format!("project:{}", FIRST_PROJECT + p);
    ws.send(Message::Text(
        json!({"type": "join", "room": room, "since": since})
            .to_string()
            .into(),
    ))
    .await?;
    let scan = EventScan::new();
    let (mut got, mut repeats) = (0usize, 0u64);
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with("{\"type\":\"joined\"") {
            anyhow::ensure!(field(&text, "recovered") == Some("true"), "{text}");
            if want.is_empty() {
                return Ok(Resumed {
                    missing: 0,
                    repeats,
                });
            }
            continue;
        }
        if text.starts_with("{\"type\":\"left\"") || text.starts_with("{\"type\":\"error\"") {
            bail!("{text}");
        }
        let Some((_, priority)) = scan.scan(&text) else {
            continue;
        };
        let seq: i32 = priority.and_then(|v| v.parse().ok()).unwrap_or(-1);
        if want.get(got) == Some(&seq) {
            got += 1;
            if got == want.len() {
                return Ok(Resumed {
                    missing: 0,
                    repeats,
                });
            }
        } else if want[..got].contains(&seq) {
            repeats += 1;
        } else {
            // Out of order or not owed: the stream is wrong; count what it still lacks.
            return Ok(Resumed {
                missing: (want.len() - got) as u64,
                repeats: repeats + 1,
            });
        }
    }
}

/// Stalled replays beside another workload: `--users` users of one project, `--per-user`
/// connections each, join with a position from before a backlog of `--backlog` changes and never
/// read. Runs for `--seconds`, then reports how many the relay closed as too slow (4008).
async fn stall(args: &Args) -> anyhow::Result<Value> {
    let shape = Shape::from(args)?;
    let relay: SocketAddr = args.text("relay", "127.0.0.1:8080").parse()?;
    let project = args.num("project", 19)? as i64;
    let users = args.num("users", 10)? as i64;
    let per_user = args.num("per-user", 18)? as usize;
    let backlog = args.num("backlog", 20_000)? as i64;
    let seconds = args.num("seconds", 60)?;
    let db = db(&args.text("db", "")).await?;
    let room = format!("project:{}", FIRST_PROJECT + project);
    let mut probe = connect(relay, &Shape::user(project, 1), 0).await?;
    probe
        .send(Message::Text(
            json!({"type": "join", "room": room}).to_string().into(),
        ))
        .await?;
    let since = loop {
        let text = next_text(&mut probe).await?;
        if text.starts_with("{\"type\":\"joined\"") {
            break field(&text, "position").context("position")?.to_owned();
        }
    };
    drop(probe);
    db.execute(
        "INSERT INTO comments (task_id, project_id, author_id, body)
         SELECT $1, $2, $3, repeat('x', 600) || g FROM generate_series(1, $4::int) g",
        &[
            &Shape::task_id(project, 1),
            &(FIRST_PROJECT + project),
            &Shape::user(project, 0),
            &(backlog as i32),
        ],
    )
    .await?;
    // Each connection joins, reads nothing, and after `hold` seconds (longer than the relay lets
    // a replay stall) reconnects and does it again: an adversary keeping the flood up.
    let hold = Duration::from_secs(args.num("hold", 15)?);
    let until = Instant::now() + Duration::from_secs(seconds);
    let (opened, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for u in 0..users {
        for c in 0..per_user {
            let user = Shape::user(project, 1 + u % (shape.members - 1));
            let (room, since) = (room.clone(), since.clone());
            let (opened, failed) = (opened.clone(), failed.clone());
            let k = 1 + (u as usize) * per_user + c;
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let Ok(mut ws) = connect(relay, &user, k).await else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    };
                    let join = json!({"type": "join", "room": room, "since": since});
                    if ws
                        .send(Message::Text(join.to_string().into()))
                        .await
                        .is_ok()
                    {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    tokio::time::sleep(hold.min(left)).await;
                }
            }));
        }
    }
    eprintln!("stall: {} stalled replays open", users as usize * per_user);
    for task in tasks {
        task.await?;
    }
    Ok(json!({
        "workload": "stall",
        "stalled_connections": users as usize * per_user,
        "stalled_replays_opened": opened.load(Ordering::Relaxed),
        "connects_failed": failed.load(Ordering::Relaxed),
        "backlog": backlog,
        "relay_replay_stalls": relay_metric(relay, "replay_stalls_total").await?,
        "relay_replays_waiting": relay_metric(relay, "replays_waiting").await?,
    }))
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(command) = argv.first().cloned() else {
        bail!("usage: loadgen <setup|fanout|bulk|joins|idle|storm|stall> [--option value]...");
    };
    let args = Args::parse(&argv[1..])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.num("threads", 1)? as usize)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        match command.as_str() {
            "setup" => setup(&args).await,
            "fanout" => fanout(&args).await,
            "bulk" => bulk(&args).await,
            "joins" => joins(&args).await,
            "idle" => idle(&args).await,
            "storm" => storm(&args).await,
            "stall" => stall(&args).await,
            other => bail!("unknown workload {other}"),
        }
    })?;
    let mut result = result;
    result["loadgen_cpu_s"] = json!(own_cpu_seconds());
    println!("{result}");
    Ok(())
}
