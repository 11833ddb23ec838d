//! What the browser client relies on: `sync`/`synced` (how `caughtUp` knows), and the wire
//! messages matching `docs/protocol.schema.json`, the schema other languages generate clients from.

mod common;

use common::*;
use serde_json::{json, Value};

async fn position(relay: &TestRelay) -> String {
    let row = relay
        .db
        .query_one("SELECT pgrelay.position()", &[])
        .await
        .expect("pgrelay.position()");
    row.get(0)
}

#[tokio::test]
async fn synced_follows_every_change_up_to_the_position_even_when_none_is_visible() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    let mut bob = relay.client("u2").await;
    alice.join("project:1").await;
    bob.join("project:1").await;

    // An API's write, then the position it hands back (taken after the commit, so it covers it).
    relay
        .sql("UPDATE tasks SET status = 'done' WHERE id = 1")
        .await;
    let after_write = position(&relay).await;
    alice
        .send(json!({"type": "sync", "room": "project:1", "position": after_write, "ref": "s1"}))
        .await;
    let event = alice.recv().await;
    assert_eq!(event["event"], "task_updated", "the write first: {event}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "synced", "room": "project:1", "position": after_write, "ref": "s1"})
    );

    assert_eq!(
        bob.recv_event().await["event"],
        "task_updated",
        "bob sees the first write"
    );

    // A write bob may not read (task 3 is private to alice): synced still comes, with nothing
    // before it, so bob's UI knows the server's truth has arrived.
    relay
        .sql("UPDATE tasks SET title = 'Sponsor: signed' WHERE id = 3")
        .await;
    let private_write = position(&relay).await;
    bob.send(json!({"type": "sync", "room": "project:1", "position": private_write, "ref": "s2"}))
        .await;
    let reply = bob.recv().await;
    assert_eq!(
        reply["type"], "synced",
        "nothing about the private task: {reply}"
    );
    assert_eq!(reply["ref"], "s2");
    bob.expect_nothing(std::time::Duration::from_millis(300))
        .await;

    // A position already behind the stream is answered at once.
    alice
        .send(json!({"type": "sync", "room": "project:1", "position": after_write, "ref": "s3"}))
        .await;
    assert_eq!(
        alice.recv().await["event"],
        "task_updated",
        "the private write, for alice"
    );
    assert_eq!(alice.recv().await["ref"], "s3");

    alice
        .send(json!({"type": "sync", "room": "task:1", "position": after_write, "ref": "s4"}))
        .await;
    let refused = alice.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("not_joined"), Some("s4"))
    );
    alice
        .send(
            json!({"type": "sync", "room": "project:1", "position": "not-a-position", "ref": "s5"}),
        )
        .await;
    assert_eq!(
        alice.recv().await["code"],
        "bad_request",
        "a position the relay did not issue"
    );
}

#[tokio::test]
async fn the_relays_messages_match_the_protocol_schema() {
    let schema: Value = serde_json::from_str(include_str!("../docs/protocol.schema.json"))
        .expect("docs/protocol.schema.json is JSON");
    let relay = TestRelay::start().await;
    let mut seen: Vec<Value> = Vec::new();
    let mut sent: Vec<Value> = Vec::new();

    let mut alice = relay.client("u1").await;
    alice.skip_presence = false;
    let mut send = |m: Value| {
        sent.push(m.clone());
        m
    };
    alice.send(send(json!({"type": "ping", "ref": "p"}))).await;
    seen.push(alice.recv().await);
    alice
        .send(send(
            json!({"type": "join", "room": "project:1", "ref": "j"}),
        ))
        .await;
    seen.push(alice.recv().await); // joined
    seen.push(alice.recv().await); // presence_state
    alice
        .send(send(
            json!({"type": "presence", "room": "project:1", "meta": {"status": "viewing"}}),
        ))
        .await;
    seen.push(alice.recv().await); // presence_diff
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;
    seen.push(alice.recv().await); // bob's presence_diff
    bob.send(send(
        json!({"type": "typing", "room": "project:1", "typing": true}),
    ))
    .await;
    seen.push(alice.recv().await); // typing
    relay
        .sql("UPDATE tasks SET status = 'done' WHERE id = 1")
        .await;
    seen.push(alice.recv().await); // event with old
    let at = position(&relay).await;
    alice
        .send(send(
            json!({"type": "sync", "room": "project:1", "position": at, "ref": "s"}),
        ))
        .await;
    seen.push(alice.recv().await); // synced
    alice
        .send(send(json!({"type": "join", "room": "project:2"})))
        .await;
    seen.push(alice.recv().await); // error forbidden
    alice
        .send(send(
            json!({"type": "join", "room": "project:1", "since": at}),
        ))
        .await;
    seen.push(alice.recv().await); // joined with recovered
    alice
        .send(send(
            json!({"type": "leave", "room": "project:1", "ref": "l"}),
        ))
        .await;
    let left = loop {
        let m = alice.recv().await;
        if m["type"] == "left" {
            break m;
        }
    };
    seen.push(left);
    alice
        .send(send(
            json!({"type": "auth", "token": token("u1"), "ref": "a"}),
        ))
        .await;
    seen.push(alice.recv().await); // ready

    let mut types: Vec<&str> = seen.iter().filter_map(|m| m["type"].as_str()).collect();
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        [
            "error",
            "event",
            "joined",
            "left",
            "pong",
            "presence_diff",
            "presence_state",
            "ready",
            "synced",
            "typing"
        ],
        "every kind of server message was collected"
    );
    for message in &seen {
        if let Err(why) = validate(&schema, &schema["$defs"]["serverMessage"], message) {
            panic!("{message} does not match the schema: {why}");
        }
    }
    for message in &sent {
        if let Err(why) = validate(&schema, &schema["$defs"]["clientMessage"], message) {
            panic!("{message} does not match the schema: {why}");
        }
    }
    // The validator can fail: a field the schema does not know, a missing one, a wrong type.
    let bad = [
        json!({"type": "pong", "extra": 1}),
        json!({"type": "joined", "room": "project:1"}),
        json!({"type": "event", "room": "project:1", "id": "x", "event": "e", "table": "t", "op": "MERGE", "row": {}, "ts": "t"}),
        json!({"type": "synced", "room": 5, "position": "x"}),
    ];
    for message in bad {
        assert!(
            validate(&schema, &schema["$defs"]["serverMessage"], &message).is_err(),
            "{message} must not validate"
        );
    }
}

/// A small JSON Schema validator for the keywords `docs/protocol.schema.json` uses: `$ref` (local),
/// `type`, `const`, `enum`, `required`, `properties`, `additionalProperties`, `items`, `oneOf`,
/// `anyOf`, `minLength`, `maxLength`. (`pattern` and `format` are not checked.)
fn validate(root: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = reference
            .strip_prefix("#/")
            .ok_or_else(|| format!("unsupported $ref {reference}"))?
            .split('/')
            .fold(root, |node, key| &node[key]);
        if target.is_null() {
            return Err(format!("unresolved $ref {reference}"));
        }
        return validate(root, target, value);
    }
    if let Some(expected) = schema.get("const") {
        if expected != value {
            return Err(format!("expected {expected}, got {value}"));
        }
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return Err(format!("{value} is not one of {options:?}"));
        }
    }
    if let Some(kind) = schema["type"].as_str() {
        let ok = match kind {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "null" => value.is_null(),
            other => return Err(format!("unsupported type {other}")),
        };
        if !ok {
            return Err(format!("expected {kind}, got {value}"));
        }
    }
    if let Some(text) = value.as_str() {
        let chars = text.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| chars < min)
            || schema["maxLength"].as_u64().is_some_and(|max| chars > max)
        {
            return Err(format!("{value}: length out of bounds"));
        }
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let matching = options
            .iter()
            .filter(|s| validate(root, s, value).is_ok())
            .count();
        if matching != 1 {
            return Err(format!("{matching} of oneOf match"));
        }
    }
    if let Some(options) = schema["anyOf"].as_array() {
        if !options.iter().any(|s| validate(root, s, value).is_ok()) {
            return Err("no anyOf matches".into());
        }
    }
    if let Some(object) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            if !object.contains_key(key) {
                return Err(format!("missing `{key}`"));
            }
        }
        for (key, field) in object {
            match schema["properties"].get(key) {
                Some(property) => {
                    validate(root, property, field).map_err(|e| format!("`{key}`: {e}"))?
                }
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("unexpected `{key}`")),
                    Some(extra @ Value::Object(_)) => {
                        validate(root, extra, field).map_err(|e| format!("`{key}`: {e}"))?
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for item in array {
            validate(root, items, item)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_board_and_its_demo_endpoints_exist_only_in_development_mode() {
    let relay = TestRelay::start().await;
    for path in ["/", "/board.js", "/demo/users", "/demo/board?token=x"] {
        let (status, _) = http_get(&format!("http://{}{path}", relay.addr())).await;
        assert_eq!(status, 404, "{path} on a relay with a real database");
    }
    let demo = TestRelay::start_with(|config| {
        config.demo = Some(pgrelay::demo::Demo {
            secret: SECRET.to_vec(),
        })
    })
    .await;
    let (status, page) = http_get(&format!("http://{}/", demo.addr())).await;
    assert_eq!(status, 200);
    assert!(page.contains("board.js"), "the board's page");
    let (status, body) = http_get(&format!("http://{}/demo/users", demo.addr())).await;
    assert_eq!(status, 200);
    let users: Value = serde_json::from_str(&body).expect("JSON");
    let bob = users["users"][1]["token"].as_str().expect("bob's token");
    let (status, body) = http_get(&format!("http://{}/demo/board?token={bob}", demo.addr())).await;
    assert_eq!(status, 200, "{body}");
    let board: Value = serde_json::from_str(&body).expect("JSON");
    let ids: Vec<i64> = board["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_i64())
        .collect();
    assert_eq!(
        ids,
        [1, 2],
        "bob's tasks of project 1, without alice's private one"
    );
    assert!(board["position"].is_string());
}

#[tokio::test]
async fn demo_simulate_writes_changes_the_relay_delivers() {
    let relay = TestRelay::start().await;
    let mut carol = relay.client("u3").await;
    carol.join("project:2").await;
    carol.join("project:1").await;
    let before: i64 = relay
        .db
        .query_one("SELECT count(*) FROM pgrelay.changes", &[])
        .await
        .expect("count")
        .get(0);
    for _ in 0..20 {
        pgrelay::demo::simulate::step(&relay.db)
            .await
            .expect("a simulated step");
    }
    let after: i64 = relay
        .db
        .query_one("SELECT count(*) FROM pgrelay.changes", &[])
        .await
        .expect("count")
        .get(0);
    assert!(
        after >= before + 20,
        "every step wrote ({before} -> {after})"
    );
    let event = carol.recv_event().await;
    assert!(
        ["task_", "comment_"]
            .iter()
            .any(|p| event["event"].as_str().is_some_and(|e| e.starts_with(p))),
        "{event}"
    );
}
