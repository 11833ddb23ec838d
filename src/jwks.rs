//! Token keys published at a URL (`PGRELAY_JWT_JWKS_URL`): Auth0, Clerk, Cognito, Keycloak and
//! Supabase Auth all publish their signing keys as a JWKS document.
//!
//! The document is fetched at start (the relay does not start without keys), then again:
//! - when a token names a `kid` the relay does not know (the identity provider rotated its keys),
//!   at most once per [`JwksOptions::min_refetch`] however many such tokens arrive, so tokens
//!   with made-up `kid`s cannot turn the relay into a load generator against the provider;
//! - every [`JwksOptions::refresh_every`], so a key the provider withdrew stops being accepted.
//!
//! A fetch that fails (the URL is down, the document is broken) keeps the keys in use: the relay
//! goes on serving every token it could verify before.
//!
//! One HTTP/1.1 GET every few minutes needs no connection pool: each fetch opens a connection
//! (TLS for `https`, with the operating system's CAs or `PGRELAY_JWT_JWKS_CA_FILE`), reads at most
//! [`MAX_DOCUMENT_BYTES`], and closes it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::time::Instant;

/// A JWKS document is a few kilobytes; anything much larger is not one.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// How long one fetch may take, connection and TLS included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct JwksOptions {
    /// Fetch again this often.
    pub refresh_every: Duration,
    /// At most one fetch for unknown `kid`s per this long.
    pub min_refetch: Duration,
}

impl Default for JwksOptions {
    fn default() -> JwksOptions {
        JwksOptions {
            refresh_every: Duration::from_secs(300),
            min_refetch: Duration::from_secs(10),
        }
    }
}

/// Where the keys come from, and when they were last asked for.
pub struct JwksSource {
    url: Uri,
    tls: Arc<rustls::ClientConfig>,
    pub options: JwksOptions,
    /// When the last fetch for an unknown `kid` started. The lock also makes concurrent
    /// unknown-`kid` tokens wait for one fetch instead of starting one each.
    last_kid_fetch: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
}

impl JwksSource {
    /// Checks the URL and prepares TLS; fetches nothing yet. `ca_file` replaces the operating
    /// system's CAs for `https` (an identity provider with a private CA).
    pub fn new(url: &str, ca_file: Option<&Path>, options: JwksOptions) -> anyhow::Result<Self> {
        let url: Uri = url
            .parse()
            .with_context(|| format!("PGRELAY_JWT_JWKS_URL {url:?} is not a URL"))?;
        anyhow::ensure!(
            matches!(url.scheme_str(), Some("https" | "http")) && url.host().is_some(),
            "PGRELAY_JWT_JWKS_URL {url} must be an http:// or https:// URL with a host"
        );
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in
                    crate::db::connect::read_certs(path).context("PGRELAY_JWT_JWKS_CA_FILE")?
                {
                    roots
                        .add(cert)
                        .with_context(|| format!("{}: not a usable CA", path.display()))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // Some stores hold certificates webpki cannot use; skip those.
                    let _ = roots.add(cert);
                }
            }
        }
        let tls =
            rustls::ClientConfig::builder_with_provider(crate::db::connect::crypto_provider())
                .with_safe_default_protocol_versions()
                .context("TLS: no protocol version available")?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(JwksSource {
            url,
            tls: Arc::new(tls),
            options,
            last_kid_fetch: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// How many fetches were attempted (for tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Fetches the document. The error says which URL and what went wrong.
    pub async fn fetch(&self) -> anyhow::Result<Bytes> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {FETCH_TIMEOUT:?}"))
            .and_then(|fetched| fetched)
            .with_context(|| format!("fetching the JWKS from {}", self.url))
    }

    /// Runs `refetch` unless a fetch for an unknown `kid` started less than `min_refetch` ago.
    /// Returns whether it ran.
    pub async fn for_unknown_kid<F, Fut>(&self, refetch: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut last = self.last_kid_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.options.min_refetch) {
            return false;
        }
        *last = Some(Instant::now());
        refetch().await;
        true
    }

    async fn get(&self) -> anyhow::Result<Bytes> {
        let host = self.url.host().unwrap_or_default();
        // A bracketed IPv6 literal in a URL is a plain address to the socket and to TLS.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let https = self.url.scheme_str() == Some("https");
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        if https {
            let name = ServerName::try_from(host.to_owned())
                .with_context(|| format!("{host:?} is not a name TLS can check"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .with_context(|| {
                    format!("TLS with {host} (is its CA trusted? see PGRELAY_JWT_JWKS_CA_FILE)")
                })?;
            self.request(TokioIo::new(tls)).await
        } else {
            self.request(TokioIo::new(tcp)).await
        }
    }

    async fn request<IO>(&self, io: IO) -> anyhow::Result<Bytes>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        let driving = tokio::spawn(connection);
        let authority = self.url.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = self.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("pgrelay/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        if status.is_redirection() {
            anyhow::bail!("HTTP {status}: redirects are not followed; configure the final URL");
        }
        anyhow::ensure!(status == StatusCode::OK, "HTTP {status}");
        let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|err| anyhow::anyhow!("reading the document: {err}"))?
            .to_bytes();
        driving.abort();
        Ok(body)
    }
}
