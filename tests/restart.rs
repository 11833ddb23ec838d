//! Postgres restarted under a running relay (a test binary of its own: it stops its cluster).

mod common;

use std::time::Duration;

use common::TestRelay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_and_repeats_nothing_and_readyz_tells() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("task:1").await;
    let ready = || async {
        common::http_get(&format!("http://{}/readyz", relay.addr()))
            .await
            .0
    };

    for i in 0..10 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    // Committed just before the restart, maybe not yet delivered: must arrive afterwards.
    common::stop_cluster().await;
    let mut saw_not_ready = false;
    for _ in 0..200 {
        if ready().await == 503 {
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        saw_not_ready,
        "readyz must report the database as unreachable"
    );
    common::start_cluster_again().await;

    let db = common::connect(&relay.db_url).await;
    for i in 10..20 {
        db.batch_execute(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await
            .expect("write");
    }
    for i in 0..20 {
        let event = alice.recv_event().await;
        assert_eq!(
            event["row"]["priority"], i,
            "nothing lost, nothing repeated: {event}"
        );
    }
    for _ in 0..200 {
        if ready().await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("readyz never recovered");
}
