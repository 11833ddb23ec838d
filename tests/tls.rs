//! TLS to Postgres: a cluster with `ssl=on`, a certificate made here, and `hostssl`-only access
//! (a test binary of its own: it turns its cluster's plain connections off).
//!
//! The server's certificate names `localhost` only, and is signed by a CA made here; a second,
//! unrelated CA stands for "the wrong root certificate".

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use common::TestRelay;
use pgrelay::db::Database;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

struct Tls {
    /// A database with the demo data, reachable only over TLS: `postgres://…@127.0.0.1:P/db`.
    url: String,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that did not.
    other_ca: PathBuf,
}

static SETUP: tokio::sync::OnceCell<Tls> = tokio::sync::OnceCell::const_new();

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, key)
}

/// Turns the cluster's TLS on and plain connections off, once for the whole binary.
async fn setup() -> &'static Tls {
    SETUP
        .get_or_init(|| async {
            // Made while plain connections still work.
            let url = common::fresh_database().await;
            let admin = common::cluster_url("postgres").await;
            let data = common::cluster_data_dir().await;

            let (ca_cert, ca_key) = ca("pgrelay test CA");
            let (other_cert, _) = ca("some other CA");
            let server_key = KeyPair::generate().expect("server key");
            let server = CertificateParams::new(vec!["localhost".to_string()])
                .expect("server params")
                .signed_by(&server_key, &ca_cert, &ca_key)
                .expect("server certificate");

            // The server reads its key only if the server's user owns it and nobody else may.
            let owner = std::fs::metadata(&data).expect("data dir");
            for (name, pem) in [
                ("server.crt", server.pem()),
                ("server.key", server_key.serialize_pem()),
            ] {
                let path = data.join(name);
                std::fs::write(&path, pem).expect("write");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
                std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))
                    .expect("chown");
            }
            let hba = data.join("pg_hba.conf");
            std::fs::write(
                &hba,
                "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .expect("pg_hba.conf");
            std::os::unix::fs::chown(&hba, Some(owner.uid()), Some(owner.gid())).expect("chown");
            for sql in [
                "ALTER SYSTEM SET ssl = on",
                "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
                "ALTER SYSTEM SET ssl_key_file = 'server.key'",
                "SELECT pg_reload_conf()",
            ] {
                common::execute(&format!("{admin}?sslmode=disable"), sql).await;
            }
            // The reload is a signal: wait until plain connections are refused.
            let plain = Database::from_url(&format!("{url}?sslmode=disable")).expect("url");
            let mut refused = false;
            for _ in 0..200 {
                if plain.connect().await.is_err() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(
                refused,
                "the cluster never stopped accepting plain connections"
            );

            let dir = std::env::temp_dir().join(format!("pgrelay-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("dir");
            let (ca, other_ca) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
            std::fs::write(&ca, ca_cert.pem()).expect("write");
            std::fs::write(&other_ca, other_cert.pem()).expect("write");
            Tls { url, ca, other_ca }
        })
        .await
}

async fn connect_error(url: &str) -> String {
    let db = Database::from_url(url).expect("a valid url");
    match db.connect().await {
        Ok(_) => panic!("{url} connected"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_every_relay_connection_and_delivers() {
    let tls = setup().await;
    let relay = TestRelay::start_on(format!("{}?sslmode=require", tls.url), |_| {}).await;
    let mut alice = relay.client("u1").await;
    alice.join("task:1").await;
    relay
        .sql("UPDATE tasks SET title = 'over TLS' WHERE id = 1")
        .await;
    let event = alice.recv_event().await;
    assert_eq!(event["row"]["title"], "over TLS", "{event}");

    // Pool, LISTEN, presence bus, barrier: every session of this database is encrypted (the
    // pg_hba allows nothing else, so this also shows they all got in).
    let row = relay
        .db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(encrypted, all, "every session is encrypted");
    assert!(
        all >= 4,
        "the relay's pool, LISTEN and presence connections and ours: {all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_disable_is_refused_and_the_message_says_what_to_set() {
    let tls = setup().await;
    let err = connect_error(&format!("{}?sslmode=disable", tls.url)).await;
    assert!(err.contains("no encryption"), "the server's reason: {err}");
    assert!(err.contains("set sslmode=require"), "the hint: {err}");
    let relay =
        pgrelay::server::Relay::start(common::config(&format!("{}?sslmode=disable", tls.url)))
            .await;
    assert!(relay.is_err(), "a relay does not start without TLS here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name() {
    let tls = setup().await;
    let ca = tls.ca.display();
    // The certificate names localhost, not 127.0.0.1.
    let err = connect_error(&format!("{}?sslmode=verify-full&sslrootcert={ca}", tls.url)).await;
    assert!(err.contains("host name mismatch"), "{err}");
    assert!(
        err.contains("\"127.0.0.1\"") && err.contains("localhost"),
        "names both sides: {err}"
    );
    assert!(err.contains("sslmode=verify-full"), "{err}");

    let by_name = tls.url.replace("127.0.0.1", "localhost");
    let db = Database::from_url(&format!("{by_name}?sslmode=verify-full&sslrootcert={ca}"))
        .expect("url");
    let (client, connection) = db.connect().await.expect("verify-full with the right name");
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_accepts_the_right_ca_under_any_name_and_refuses_another() {
    let tls = setup().await;
    let db = Database::from_url(&format!(
        "{}?sslmode=verify-ca&sslrootcert={}",
        tls.url,
        tls.ca.display()
    ))
    .expect("url");
    let (client, connection) = db.connect().await.expect("verify-ca with the right CA");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("query");

    let err = connect_error(&format!(
        "{}?sslmode=verify-ca&sslrootcert={}",
        tls.url,
        tls.other_ca.display()
    ))
    .await;
    assert!(err.contains("not signed by a CA in sslrootcert"), "{err}");
    // libpq: `require` with a root certificate verifies like verify-ca.
    let err = connect_error(&format!(
        "{}?sslmode=require&sslrootcert={}",
        tls.url,
        tls.other_ca.display()
    ))
    .await;
    assert!(err.contains("not signed by a CA in sslrootcert"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_tail_connect_with_the_urls_tls_settings() {
    use tokio::io::AsyncBufReadExt;
    let tls = setup().await;
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        tls.url.replace("127.0.0.1", "localhost"),
        tls.ca.display()
    );
    let migrated = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["migrate", "--library-only"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .expect("run migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["tail", "--room", "task:2"])
        .env("DATABASE_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run tail");
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().expect("stdout")).lines();
    // tail starts from "now": keep writing until it prints one.
    let db = common::connect(&format!("{}?sslmode=require", tls.url)).await;
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        // A new title each time: an UPDATE that changes nothing is not a change.
        for i in 0.. {
            db.batch_execute(&format!(
                "UPDATE tasks SET title = 'tailed {i}' WHERE id = 2"
            ))
            .await
            .expect("write");
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
            {
                return line;
            }
        }
        unreachable!("the loop only ends by returning")
    })
    .await
    .expect("tail printed a change over TLS");
    assert!(line.contains("\"tailed "), "{line}");
}
