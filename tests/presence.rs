//! Presence and typing across relay processes (docs/protocol.md).
//!
//! Demo data: alice (u1) owns project 1, bob (u2) is a member, carol (u3) a viewer; dave (u4) has
//! no access. Every test runs two relays on one database, as behind a load balancer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{TestRelay, WsClient, WAIT};
use pgrelay::config::RelayConfig;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Fast timings, so that a dead relay and an idle typist are noticed within a second.
fn fast(config: &mut RelayConfig) {
    config.presence.heartbeat = Duration::from_millis(100);
    config.presence.relay_timeout = Duration::from_millis(600);
    config.presence.typing_timeout = Duration::from_millis(1500);
}

async fn two_relays() -> (TestRelay, TestRelay) {
    let first = TestRelay::start_with(fast).await;
    let second = TestRelay::start_on(first.db_url.clone(), fast).await;
    (first, second)
}

/// A client that keeps its own copy of a room's presence from `presence_state` and diffs.
struct Watcher {
    client: WsClient,
    room: String,
    users: BTreeMap<String, Vec<Value>>,
    typing: BTreeSet<String>,
    /// Typing messages received, in order.
    typing_log: Vec<(String, bool)>,
}

impl Watcher {
    async fn join(relay: &TestRelay, user: &str, room: &str) -> Watcher {
        let mut client = relay.client(user).await;
        client.skip_presence = false;
        client.join(room).await;
        let mut watcher = Watcher {
            client,
            room: room.to_owned(),
            users: BTreeMap::new(),
            typing: BTreeSet::new(),
            typing_log: Vec::new(),
        };
        let state = watcher
            .client
            .presence_state
            .take()
            .expect("presence_state");
        watcher.apply(&state);
        watcher
    }

    fn apply(&mut self, message: &Value) {
        if message["type"] == "event" {
            return; // changes in the room are not what these tests are about
        }
        assert_eq!(message["room"], self.room.as_str(), "{message}");
        match message["type"].as_str() {
            Some("presence_state") => {
                self.users = serde_json::from_value(message["users"].clone()).expect("users");
            }
            Some("presence_diff") => {
                let metas = |field: &str| -> BTreeMap<String, Vec<Value>> {
                    serde_json::from_value(message[field].clone()).expect("metas")
                };
                for (user, gone) in metas("leaves") {
                    let metas = self.users.entry(user.clone()).or_default();
                    metas.retain(|m| !gone.contains(m));
                    if metas.is_empty() {
                        self.users.remove(&user);
                    }
                }
                for (user, came) in metas("joins") {
                    self.users.entry(user).or_default().extend(came);
                }
            }
            Some("typing") => {
                let user = message["user"].as_str().expect("user").to_owned();
                let typing = message["typing"].as_bool().expect("typing");
                self.typing_log.push((user.clone(), typing));
                if typing {
                    self.typing.insert(user);
                } else {
                    self.typing.remove(&user);
                }
            }
            _ => panic!("unexpected message {message}"),
        }
    }

    /// Reads messages until `done` holds for this watcher (panics after [`WAIT`]).
    async fn until(&mut self, what: &str, done: impl Fn(&Watcher) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            let next = tokio::time::timeout_at(deadline, self.client.recv_any()).await;
            let message = next.unwrap_or_else(|_| {
                panic!("timed out waiting for {what}; presence is {:?}", self.users)
            });
            self.apply(&message);
        }
    }

    /// The users present, with how many connections each.
    fn present(&self) -> BTreeMap<&str, usize> {
        self.users
            .iter()
            .map(|(user, metas)| (user.as_str(), metas.len()))
            .collect()
    }

    /// Reads everything that arrives for `quiet`.
    async fn drain(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while let Ok(message) = tokio::time::timeout_at(deadline, self.client.recv_any()).await {
            self.apply(&message);
        }
    }
}

fn present(pairs: &[(&'static str, usize)]) -> BTreeMap<&'static str, usize> {
    pairs.iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_seen_on_both_relays_and_tabs_are_metas() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "project:1").await;
    let mut bob = Watcher::join(&b, "u2", "project:1").await;
    let both = present(&[("u1", 1), ("u2", 1)]);
    alice.until("bob to appear", |w| w.present() == both).await;
    bob.until("alice to appear", |w| w.present() == both).await;

    // Alice opens two more tabs, one on each relay: still one user, with three metas.
    let tab2 = Watcher::join(&a, "u1", "project:1").await;
    let tab3 = Watcher::join(&b, "u1", "project:1").await;
    let three_tabs = present(&[("u1", 3), ("u2", 1)]);
    bob.until("alice's tabs", |w| w.present() == three_tabs)
        .await;
    alice
        .until("alice's own tabs", |w| w.present() == three_tabs)
        .await;
    let ids: BTreeSet<&str> = bob.users["u1"]
        .iter()
        .map(|m| m["conn_id"].as_str().expect("conn_id"))
        .collect();
    assert_eq!(ids.len(), 3, "each tab has its own conn_id: {ids:?}");

    // Closing a tab is a diff, not a leave of the user.
    drop(tab3);
    drop(tab2);
    let one_tab = present(&[("u1", 1), ("u2", 1)]);
    bob.until("two tabs closed", |w| w.present() == one_tab)
        .await;
    alice
        .until("two tabs closed", |w| w.present() == one_tab)
        .await;

    // Leaving the room is seen on the other relay.
    bob.client
        .send(json!({"type": "leave", "room": "project:1"}))
        .await;
    alice
        .until("bob to leave", |w| w.present() == present(&[("u1", 1)]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_updates_reach_every_relay_and_bad_ones_are_refused() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "task:1").await;
    let mut bob = Watcher::join(&b, "u2", "task:1").await;
    bob.until("alice", |w| w.users.contains_key("u1")).await;
    // Bob's join reaches alice over the bus; it must not be what she reads in place of a reply.
    alice.until("bob", |w| w.users.contains_key("u2")).await;

    alice
        .client
        .send(json!({"type": "presence", "room": "task:1", "meta": {"status": "editing"}}))
        .await;
    bob.until("alice's meta", |w| {
        w.users
            .get("u1")
            .is_some_and(|m| m.len() == 1 && m[0]["status"] == "editing")
    })
    .await;
    alice
        .until("her own meta", |w| {
            w.users
                .get("u1")
                .is_some_and(|m| m[0]["status"] == "editing")
        })
        .await;

    let big = "x".repeat(2000);
    alice
        .client
        .send(json!({"type": "presence", "room": "task:1", "meta": {"big": big}, "ref": "big"}))
        .await;
    let error = alice.client.recv_any().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("bad_request"), Some("big")),
        "{error}"
    );
    alice
        .client
        .send(json!({"type": "presence", "room": "task:2", "meta": {}, "ref": "other"}))
        .await;
    let error = alice.client.recv_any().await;
    assert_eq!(error["code"], "not_joined", "{error}");
    bob.drain(Duration::from_millis(300)).await;
    assert_eq!(
        bob.users["u1"][0]["status"], "editing",
        "refused metas change nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_others_only_throttled_and_expires() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "task:1").await;
    let mut alice_tab = Watcher::join(&a, "u1", "task:1").await;
    let mut bob = Watcher::join(&b, "u2", "task:1").await;
    bob.until("alice", |w| w.users.get("u1").is_some_and(|m| m.len() == 2))
        .await;

    // A burst of keystrokes: at most one change per 250 ms is relayed.
    let started = Instant::now();
    for i in 0..20 {
        alice
            .client
            .send(json!({"type": "typing", "room": "task:1", "typing": i % 2 == 0}))
            .await;
    }
    let burst = started.elapsed();
    alice
        .client
        .send(json!({"type": "typing", "room": "task:1", "typing": true}))
        .await;
    bob.until("alice typing", |w| w.typing.contains("u1")).await;
    bob.drain(Duration::from_millis(300)).await;
    let relayed = bob.typing_log.len();
    // One per 250 ms while the burst lasts, plus slack for the relay reading it later.
    let allowed = 2 + (burst.as_millis() / 250) as usize + 1;
    assert!(
        relayed <= allowed,
        "{relayed} typing messages relayed for a burst of 20 in {burst:?}"
    );
    assert_eq!(bob.typing_log[0], ("u1".to_owned(), true));

    // Not echoed to the typist, nor to her other tab.
    alice.drain(Duration::from_millis(100)).await;
    alice_tab.drain(Duration::from_millis(100)).await;
    assert!(alice.typing_log.is_empty() && alice_tab.typing_log.is_empty());

    // Without a refresh it ends on its own, on every relay.
    bob.until("alice's typing to expire", |w| !w.typing.contains("u1"))
        .await;

    // A refresh (relayed at most once a second) keeps it alive, without a new message.
    alice
        .client
        .send(json!({"type": "typing", "room": "task:1", "typing": true}))
        .await;
    let first = Instant::now();
    bob.until("alice typing again", |w| w.typing.contains("u1"))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    alice
        .client
        .send(json!({"type": "typing", "room": "task:1", "typing": true}))
        .await;
    let refreshed = Instant::now();
    bob.until("the refreshed typing to expire", |w| {
        !w.typing.contains("u1")
    })
    .await;
    assert!(
        refreshed.elapsed() >= Duration::from_millis(1200),
        "expired {:?} after the refresh; the timeout is 1.5 s",
        refreshed.elapsed()
    );
    assert!(first.elapsed() >= Duration::from_millis(2400));
    let log = &bob.typing_log[bob.typing_log.len() - 2..];
    assert_eq!(
        log,
        [("u1".to_owned(), true), ("u1".to_owned(), false)],
        "a refresh is not a new typing message"
    );

    // Typing stops when the typist's last connection leaves.
    alice
        .client
        .send(json!({"type": "typing", "room": "task:1", "typing": true}))
        .await;
    bob.until("alice typing again", |w| w.typing.contains("u1"))
        .await;
    drop(alice);
    drop(alice_tab);
    bob.until("alice gone", |w| !w.users.contains_key("u1"))
        .await;
    bob.until("alice's typing ended", |w| !w.typing.contains("u1"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_leaves_no_ghosts_even_after_it_restarts() {
    let a = TestRelay::start_with(fast).await;
    let start_other = || common::spawn_relay(&a.db_url, &["--presence-heartbeat", "100ms"]);
    let connect =
        |addr: String, user: &'static str| async move { common::client_at(&addr, user).await };

    let mut alice = Watcher::join(&a, "u1", "project:1").await;
    let (mut other, addr) = start_other().await;
    let mut carol = connect(addr.clone(), "u3").await;
    carol.join("project:1").await;
    alice
        .until("carol", |w| w.present() == present(&[("u1", 1), ("u3", 1)]))
        .await;

    other.start_kill().expect("SIGKILL");
    other.wait().await.expect("reaped");
    let killed = Instant::now();
    alice
        .until("carol to be dropped", |w| {
            w.present() == present(&[("u1", 1)])
        })
        .await;
    let noticed = killed.elapsed();
    assert!(
        noticed < Duration::from_secs(3),
        "a dead relay's users leave within the bound (600 ms timeout), took {noticed:?}"
    );

    // The relay comes back with a new identity: bob connects to it, carol's ghost stays gone.
    let (_other, addr) = start_other().await;
    let mut bob = connect(addr, "u2").await;
    bob.join("project:1").await;
    alice.until("bob", |w| w.users.contains_key("u2")).await;
    alice.drain(Duration::from_millis(800)).await;
    assert_eq!(alice.present(), present(&[("u1", 1), ("u2", 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_who_may_not_join_see_no_presence_and_revoked_ones_stop_seeing_it() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "project:1").await;

    // Dave may not join: he gets no state, and may not set presence or type there.
    let mut dave = b.client("u4").await;
    dave.skip_presence = false;
    dave.send(json!({"type": "join", "room": "project:1", "ref": "j"}))
        .await;
    assert_eq!(dave.recv_any().await["code"], "forbidden");
    for message in [
        json!({"type": "presence", "room": "project:1", "meta": {}}),
        json!({"type": "typing", "room": "project:1", "typing": true}),
    ] {
        dave.send(message).await;
        assert_eq!(dave.recv_any().await["code"], "not_joined");
    }

    // Bob is in the room until he is removed from the project.
    let mut bob = Watcher::join(&b, "u2", "project:1").await;
    alice.until("bob", |w| w.users.contains_key("u2")).await;
    // Alice's join may reach bob's relay over the bus after his presence_state.
    bob.until("alice", |w| w.users.contains_key("u1")).await;
    // Revocation takes effect at the membership change itself (the update after it is there to
    // show that nothing more reaches bob).
    a.sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    a.sql("UPDATE tasks SET priority = coalesce(priority, 0) + 1 WHERE id = 1")
        .await;
    let left = loop {
        let message = bob.client.recv_any().await;
        if message["type"] == "left" {
            break message;
        }
        assert_ne!(message["type"], "presence_diff", "{message}");
    };
    assert_eq!(left["reason"], "revoked");
    alice
        .until("bob to be gone", |w| !w.users.contains_key("u2"))
        .await;

    // What happens in the room afterwards reaches neither of them.
    alice
        .client
        .send(json!({"type": "presence", "room": "project:1", "meta": {"after": true}}))
        .await;
    alice
        .client
        .send(json!({"type": "typing", "room": "project:1", "typing": true}))
        .await;
    let carol = Watcher::join(&a, "u3", "project:1").await;
    drop(carol);
    bob.client.skip_presence = false;
    presence_fence(&a, &mut bob.client, "u2").await;
    presence_fence(&a, &mut dave, "u4").await;
}

/// Proves that nothing of the presence that relay `a` published before reached `client` (on the
/// other relay): `client` joins its own user room, another connection of the same user joins it
/// on `a`, and that join must be the next thing `client` receives (the bus keeps one relay's
/// messages in order; a pong would not be ordered with them).
async fn presence_fence(a: &TestRelay, client: &mut WsClient, user: &str) {
    let room = format!("user:{user}");
    client.join(&room).await;
    let mut other_tab = a.client(user).await;
    other_tab.join(&room).await;
    let next = client.recv_any().await;
    assert_eq!(
        (next["type"].as_str(), next["room"].as_str()),
        (Some("presence_diff"), Some(room.as_str())),
        "expected the fence, got {next}"
    );
    assert!(next["joins"][user].is_array(), "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_bus_connection_resyncs_without_ghosts_or_gaps() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "project:1").await;
    let mut bob = b.client("u2").await;
    bob.join("project:1").await;
    alice
        .until("bob", |w| w.present() == present(&[("u1", 1), ("u2", 1)]))
        .await;

    // Both relays lose their bus connections; meanwhile bob leaves and carol arrives on b.
    a.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'pgrelay presence'",
    )
    .await;
    bob.send(json!({"type": "leave", "room": "project:1"}))
        .await;
    let mut carol = b.client("u3").await;
    carol.join("project:1").await;

    alice
        .until("the state b had while disconnected", |w| {
            w.present() == present(&[("u1", 1), ("u3", 1)])
        })
        .await;
    assert!(a.metric("presence_bus_connected").await == 1);
    assert!(b.metric("presence_relays").await == 1);
    alice.drain(Duration::from_millis(500)).await;
    assert_eq!(alice.present(), present(&[("u1", 1), ("u3", 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_id_seen_in_conn_id_cannot_be_used_to_erase_that_relays_users() {
    let (a, b) = two_relays().await;
    let mut alice = Watcher::join(&a, "u1", "project:1").await;
    let bob = Watcher::join(&b, "u2", "project:1").await;
    let both = present(&[("u1", 1), ("u2", 1)]);
    alice.until("bob to appear", |w| w.present() == both).await;
    // Any session may NOTIFY, and every client sees relay ids in conn_id.
    let conn_id = alice.users["u2"][0]["conn_id"]
        .as_str()
        .expect("conn_id")
        .to_owned();
    let (relay_b, _) = conn_id.split_once('.').expect("relay.connection");
    for forged in [
        json!({"n": relay_b, "s": 1_000_000, "bye": true}),
        json!({"n": relay_b, "s": 1_000_001, "ops": [{"k": "l", "r": "project:1", "c": 1}]}),
        json!({"n": relay_b, "s": 1_000_002, "sync": "whole", "ops": []}),
    ] {
        a.sql(&format!(
            "SELECT pg_notify('pgrelay_presence', '{}')",
            forged.to_string().replace('\'', "''")
        ))
        .await;
    }
    // Not even for a moment (a forged goodbye would be repaired by the next full state).
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(message) = tokio::time::timeout_at(deadline, alice.client.recv_any()).await {
        alice.apply(&message);
        assert_eq!(alice.present(), both, "bob is still there after {message}");
    }
    assert!(a.metric("presence_bus_rejected_total").await >= 3);
    drop(bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_presence_grew_large_never_closes_a_new_joiner() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 16 * 1024).await;
    // Twenty connections with a 1 KB meta each: more presence than a joiner's send budget.
    let mut crowd = Vec::new();
    for i in 0..20 {
        let mut client = relay.client(if i % 2 == 0 { "u1" } else { "u2" }).await;
        client.join("project:1").await;
        let meta = json!({"bio": "x".repeat(1000)});
        client
            .send(json!({"type": "presence", "room": "project:1", "meta": meta}))
            .await;
        client.ping().await;
        crowd.push(client);
    }
    let mut carol = relay.client("u3").await;
    carol.join("project:1").await;
    let state = carol.presence_state.take().expect("presence_state");
    assert_eq!(state["truncated"], true, "{state}");
    assert_eq!(state["connections"], 21);
    carol.ping().await;
    for client in &mut crowd {
        client.ping().await;
    }
}
