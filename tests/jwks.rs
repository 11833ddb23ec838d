//! Keys from a JWKS URL: a real HTTP(S) server on 127.0.0.1 that serves a JWKS document the test
//! rotates, and counts the requests it gets.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgrelay::jwks::{JwksOptions, JwksSource};
use pgrelay::jwt::Verifier;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const KEY_A: &str = include_str!("fixtures/ed25519-a.pem");
const KEY_B: &str = include_str!("fixtures/ed25519-b.pem");
/// The public halves of KEY_A and KEY_B, as JWK `x` values.
const X_A: &str = "GC5AC9E0B3Hm8q6Z6mSFK8OqbUfybMJOCiOrrGRzwsw";
const X_B: &str = "i5DtJYIZxoeDSTJtwCyDUcHGQ3hovEVVoj_PFyKOcJc";

fn jwks(keys: &[(&str, &str)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, x)| json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}))
        .collect();
    json!({ "keys": keys }).to_string()
}

fn token(private_pem: &str, kid: &str) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &header,
        &json!({"sub": "u1", "exp": exp}),
        &EncodingKey::from_ed_pem(private_pem.as_bytes()).expect("key"),
    )
    .expect("sign")
}

/// A key server: answers every request with the current document.
struct KeyServer {
    port: u16,
    document: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyServer {
    async fn start(document: String, tls: Option<Arc<rustls::ServerConfig>>) -> KeyServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let document = Arc::new(Mutex::new(document));
        let requests = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (doc, count, tls) = (doc.clone(), count.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(config) => {
                            if let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                            {
                                answer(stream, &doc, &count).await;
                            }
                        }
                        None => answer(stream, &doc, &count).await,
                    }
                });
            }
        });
        KeyServer {
            port,
            document,
            requests,
            task,
        }
    }

    fn url(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://{host}:{}/.well-known/jwks.json", self.port)
    }

    fn publish(&self, document: String) {
        *self.document.lock().expect("lock") = document;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The URL goes down: connections are refused from now on.
    fn stop(&self) {
        self.task.abort();
    }
}

async fn answer(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    document: &Mutex<String>,
    requests: &AtomicUsize,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    assert!(request.starts_with(b"GET /.well-known/jwks.json HTTP/1.1\r\n"));
    requests.fetch_add(1, Ordering::SeqCst);
    let body = document.lock().expect("lock").clone();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn verifier(url: &str, options: JwksOptions) -> Verifier {
    let source = JwksSource::new(url, None, options).expect("source");
    Verifier::from_jwks_url(source)
        .await
        .expect("keys at start")
}

#[tokio::test]
async fn a_rotated_key_works_from_its_first_token_and_unknown_kids_are_rate_limited() {
    let server = KeyServer::start(jwks(&[("a", X_A)]), None).await;
    let v = verifier(&server.url("http", "127.0.0.1"), JwksOptions::default()).await;
    assert_eq!(server.requests(), 1, "fetched at start");
    assert!(v.authenticate(&token(KEY_A, "a")).await.is_ok());
    assert_eq!(server.requests(), 1, "a known kid fetches nothing");

    // The provider rotates: b is published; its first token is accepted.
    server.publish(jwks(&[("a", X_A), ("b", X_B)]));
    let principal = v.authenticate(&token(KEY_B, "b")).await;
    assert_eq!(principal.expect("new kid accepted").user, "u1");
    assert_eq!(server.requests(), 2, "one fetch for the unknown kid");

    // Made-up kids, many and at once: within the interval, no more fetches.
    let forged: Vec<String> = (0..20).map(|i| token(KEY_B, &format!("x{i}"))).collect();
    let results = futures_util::future::join_all(forged.iter().map(|t| v.authenticate(t))).await;
    for result in results {
        assert_eq!(
            result.expect_err("unknown kid").to_string(),
            "unknown key (kid)"
        );
    }
    assert_eq!(
        server.requests(),
        2,
        "rate-limited: at most one fetch per 10 s"
    );
    assert_eq!(v.jwks_source().expect("source").fetches(), 2);
}

#[tokio::test]
async fn the_last_good_keys_stay_while_the_url_is_down_and_a_withdrawn_key_goes() {
    let server = KeyServer::start(jwks(&[("a", X_A), ("b", X_B)]), None).await;
    let options = JwksOptions {
        refresh_every: Duration::from_millis(100),
        min_refetch: Duration::from_millis(100),
    };
    let v = verifier(&server.url("http", "127.0.0.1"), options).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = tokio::spawn(pgrelay::jwt::refresh_jwks(v.clone(), shutdown.clone()));

    // Periodic refresh: the provider withdraws a.
    server.publish(jwks(&[("b", X_B)]));
    let mut withdrawn = false;
    for _ in 0..50 {
        if v.authenticate(&token(KEY_A, "a")).await.is_err() {
            withdrawn = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(withdrawn, "the periodic refresh dropped the withdrawn key");

    // The URL goes down: refreshes fail, b keeps working.
    server.stop();
    let source = v.jwks_source().expect("source").clone();
    let before = source.fetches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(source.fetches() > before, "refreshes were attempted");
    assert!(v.authenticate(&token(KEY_B, "b")).await.is_ok());
    assert!(v.authenticate(&token(KEY_A, "c")).await.is_err());
    assert!(v.authenticate(&token(KEY_B, "b")).await.is_ok());
    shutdown.cancel();
    let _ = refresher.await;

    // And a relay cannot start without any keys: the error names the URL.
    let url = server.url("http", "127.0.0.1");
    let source = JwksSource::new(&url, None, JwksOptions::default()).expect("source");
    let err = match Verifier::from_jwks_url(source).await {
        Ok(_) => panic!("no keys, no start"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains(&url) && err.contains("connecting"), "{err}");
}

#[tokio::test]
async fn https_urls_are_verified_against_the_given_ca() {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let config =
        rustls::ServerConfig::builder_with_provider(pgrelay::db::connect::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
    let server = KeyServer::start(jwks(&[("a", X_A)]), Some(Arc::new(config))).await;
    let dir = std::env::temp_dir().join(format!("pgrelay-jwks-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write");

    let url = server.url("https", "localhost");
    let source = JwksSource::new(&url, Some(&ca_path), JwksOptions::default()).expect("source");
    let v = Verifier::from_jwks_url(source)
        .await
        .expect("https with the CA");
    assert!(v.authenticate(&token(KEY_A, "a")).await.is_ok());

    // The system's CAs do not know this one.
    let source = JwksSource::new(&url, None, JwksOptions::default()).expect("source");
    let err = match Verifier::from_jwks_url(source).await {
        Ok(_) => panic!("an unknown CA was trusted"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("TLS with localhost"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn public_keys_without_an_audience_or_issuer_check_are_warned_about() {
    let dir = std::env::temp_dir().join(format!("pgrelay-jwks-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[("a", X_A)])).expect("write");
    let run = |audience: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("PGRELAY_JWT_PUBLIC_KEY_FILE", &path)
            // Nothing listens there: the relay stops right after the key checks.
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env_remove("PGRELAY_JWT_AUDIENCE")
            .env_remove("PGRELAY_JWT_ISSUER");
        if let Some(audience) = audience {
            command.env("PGRELAY_JWT_AUDIENCE", audience);
        }
        let out = command.output().expect("run pgrelay");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let warned = run(None);
    assert!(
        warned.contains("neither an audience nor an issuer"),
        "{warned}"
    );
    let quiet = run(Some("pgrelay"));
    assert!(
        !quiet.contains("neither an audience nor an issuer"),
        "{quiet}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_accepts_a_rotated_keys_first_token_on_every_transport() {
    let server = KeyServer::start(jwks(&[("a", X_A)]), None).await;
    let options = JwksOptions {
        min_refetch: Duration::ZERO,
        ..Default::default()
    };
    let v = verifier(&server.url("http", "127.0.0.1"), options).await;
    let relay = common::TestRelay::start_with(|config| config.verifier = v).await;

    // Each transport meets a kid published after the relay last fetched. (A kid is only a
    // name: the same key published again under a new kid stands for a new key.)
    server.publish(jwks(&[("a", X_A), ("b", X_B)]));
    let url = format!("{}?token={}", relay.ws_url(), token(KEY_B, "b"));
    let mut client = common::WsClient::connect(&url).await.expect("upgrade");
    assert_eq!(client.recv().await["type"], "ready", "at the upgrade");
    assert_eq!(server.requests(), 2);

    server.publish(jwks(&[("a", X_A), ("b", X_B), ("b2", X_B)]));
    let mut late = common::WsClient::connect(&relay.ws_url())
        .await
        .expect("upgrade");
    late.send(json!({"type": "auth", "token": token(KEY_B, "b2")}))
        .await;
    assert_eq!(late.recv().await["type"], "ready", "in an auth message");
    assert_eq!(server.requests(), 3);

    server.publish(jwks(&[("a", X_A), ("b", X_B), ("b2", X_B), ("a2", X_A)]));
    let sse = common::SseClient::connect(
        relay.addr(),
        &format!("/sse?rooms=task:1&token={}", token(KEY_A, "a2")),
        None,
    )
    .await;
    assert_eq!(sse.status, 200, "opening an SSE stream");
    assert_eq!(server.requests(), 4);
}
