//! Every connection the relay opens to Postgres is made here: the pool, the LISTEN connection,
//! the presence bus, the barrier connection, `migrate`, `tail`.
//!
//! `DATABASE_URL` is parsed once into a [`Database`]: the connection settings and a TLS
//! connector built from the URL's `sslmode` and `sslrootcert`, with libpq's meanings:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | always | no; but with a root certificate (`sslrootcert`, or `~/.postgresql/root.crt`) as `verify-ca` |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` and issued for the host name connected to |
//!
//! `sslrootcert=system` trusts the operating system's certificate authorities and, as in libpq 16,
//! makes `verify-full` the default (a weaker mode with it is a configuration error).
//! tokio-postgres knows only `disable`/`prefer`/`require` and no `sslrootcert`, so those options are
//! taken out of the URL before it parses the rest.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> anyhow::Result<SslMode> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plain first: a downgrade nobody should choose for a relay.
            other => anyhow::bail!(
                "sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
            ),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database to connect to: settings and TLS, parsed once. Cloning is cheap.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: MakeTls,
    mode: SslMode,
}

/// The connection half that does the I/O (spawn it or poll it).
pub type Connection = tokio_postgres::Connection<Socket, TlsStream>;

impl Database {
    /// Parses a `DATABASE_URL` (URL or `key=value` form) and builds its TLS connector. Every
    /// error here is a configuration error and says what to change.
    pub fn from_url(url: &str) -> anyhow::Result<Database> {
        let (rest, options) = split_tls_options(url)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .context("DATABASE_URL is not a valid connection string")?;
        for unsupported in ["sslcert", "sslkey", "sslpassword", "sslcrl"] {
            if options.others.iter().any(|(k, _)| k == unsupported) {
                anyhow::bail!(
                    "DATABASE_URL: {unsupported} (client certificates, revocation lists) is not supported; \
                     authenticate with a password instead"
                );
            }
        }
        let root = match options.sslrootcert.as_deref() {
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(PathBuf::from(path))),
            // libpq looks here when sslrootcert is not given.
            None => default_root_cert().map(Roots::File),
        };
        let mode = match options.sslmode.as_deref() {
            Some(text) => SslMode::parse(text)?,
            None if matches!(root, Some(Roots::System)) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if matches!(root, Some(Roots::System)) && mode != SslMode::VerifyFull {
            anyhow::bail!(
                "DATABASE_URL: sslrootcert=system requires sslmode=verify-full (got sslmode={mode}): \
                 trusting every public CA is only safe when the host name is checked too"
            );
        }
        let verify = match mode {
            SslMode::Disable | SslMode::Prefer => Verify::Nothing,
            SslMode::Require => match &root {
                // libpq: `require` with a root certificate behaves like verify-ca.
                Some(root) => Verify::Ca(root.load()?),
                None => Verify::Nothing,
            },
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let Some(root) = &root else {
                    anyhow::bail!(
                        "DATABASE_URL: sslmode={mode} needs the certificate of the CA that signed the server's: \
                         add sslrootcert=/path/to/ca.pem (or sslrootcert=system for the operating system's CAs)"
                    );
                };
                let roots = root.load()?;
                if mode == SslMode::VerifyCa {
                    Verify::Ca(roots)
                } else {
                    Verify::Full(roots)
                }
            }
        };
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Database {
            config,
            tls: MakeTls::new(verify)?,
            mode,
        })
    }

    /// The parsed settings (without the TLS options).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// The same database, with changed settings (an `application_name`, a `jit=off`).
    pub fn with_config(&self, change: impl FnOnce(&mut tokio_postgres::Config)) -> Database {
        let mut db = self.clone();
        change(&mut db.config);
        db
    }

    /// Opens one connection. The error names the server and the `sslmode`, and for the usual
    /// TLS mistakes says what to change.
    pub async fn connect(&self) -> anyhow::Result<(tokio_postgres::Client, Connection)> {
        self.config
            .connect(self.tls.clone())
            .await
            .map_err(|err| self.explain(err))
    }

    /// A pool of connections made like [`Database::connect`]'s.
    pub fn manager(&self, config: deadpool_postgres::ManagerConfig) -> deadpool_postgres::Manager {
        deadpool_postgres::Manager::from_config(self.config.clone(), self.tls.clone(), config)
    }

    /// Where the connection goes, for messages (`host:port`, never the password).
    pub fn describe(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// Adds context to a connection error: where, with which mode, and a hint for TLS trouble.
    pub fn explain(&self, err: tokio_postgres::Error) -> anyhow::Error {
        let text = match refusal(&err) {
            Some(why) => format!("TLS handshake refused: {why}"),
            None => format!("{:#}", anyhow::Error::from(err)),
        };
        let hint = if self.mode == SslMode::Disable && text.contains("no encryption") {
            Some("the server accepts only encrypted connections: set sslmode=require (or verify-full with sslrootcert) in DATABASE_URL")
        } else if text.contains("server does not support TLS") {
            Some("the server does not offer TLS (ssl=off): enable ssl on the server, or use sslmode=prefer or disable")
        } else {
            None
        };
        let mut message = format!(
            "connecting to Postgres at {} (sslmode={}): {text}",
            self.describe(),
            self.mode
        );
        if let Some(hint) = hint {
            message.push_str("; ");
            message.push_str(hint);
        }
        anyhow::anyhow!(message)
    }
}

/// Our own wording of a certificate refusal, if that is what ended the handshake. (rustls shows
/// its `Other` certificate errors in debug form; the message is worth digging out.)
fn refusal(err: &tokio_postgres::Error) -> Option<String> {
    let io = std::error::Error::source(err)?.downcast_ref::<io::Error>()?;
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<Refused>().map(|r| r.0.clone())
        }
        _ => None,
    }
}

/// A certificate name as rustls shows it (`DnsName("db.example")`), without the decoration.
fn plain_name(shown: &str) -> &str {
    shown
        .split_once('(')
        .map_or(shown, |(_, inner)| inner.trim_end_matches(')'))
        .trim_matches('"')
}

/// Where trusted CA certificates come from.
enum Roots {
    File(PathBuf),
    System,
}

impl Roots {
    fn load(&self) -> anyhow::Result<Arc<RootCertStore>> {
        let mut store = RootCertStore::empty();
        match self {
            Roots::File(path) => {
                for cert in read_certs(path)? {
                    store.add(cert).with_context(|| {
                        format!(
                            "sslrootcert {}: not a usable CA certificate",
                            path.display()
                        )
                    })?;
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // Stores hold some certificates webpki cannot use; skipping them is what
                    // every rustls user does.
                    let _ = store.add(cert);
                }
                anyhow::ensure!(
                    !store.is_empty(),
                    "sslrootcert=system: no CA certificates found in the operating system's store \
                     (install ca-certificates, or give sslrootcert=/path/to/ca.pem)"
                );
            }
        }
        Ok(Arc::new(store))
    }
}

/// The certificates in a PEM file (a CA bundle may hold several).
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            anyhow::anyhow!("{}: not a PEM certificate file: {err:?}", path.display())
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
        path.display()
    );
    Ok(certs)
}

fn default_root_cert() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

/// The ring provider, named explicitly: no process-wide default needs installing, and no
/// aws-lc (cmake, a C toolchain) is built. rustls deprecates it for lacking post-quantum key
/// exchange, which no Postgres server (OpenSSL 3.0 in Debian 12) offers yet anyway.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

enum Verify {
    /// Encrypt, trust any certificate (libpq `prefer`/`require` without a root certificate).
    Nothing,
    /// Chain to these roots; any host name.
    Ca(Arc<RootCertStore>),
    /// Chain to these roots, and the host name.
    Full(Arc<RootCertStore>),
}

/// The [`MakeTlsConnect`] every connection uses (unused for `sslmode=disable`).
#[derive(Clone)]
pub struct MakeTls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeTls {
    fn new(verify: Verify) -> anyhow::Result<MakeTls> {
        let provider = crypto_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(AcceptAny(provider.clone())),
            Verify::Ca(roots) => Arc::new(Checked {
                inner: webpki(roots, &provider)?,
                check_name: false,
            }),
            Verify::Full(roots) => Arc::new(Checked {
                inner: webpki(roots, &provider)?,
                check_name: true,
            }),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS: no protocol version available")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeTls {
            config: Arc::new(config),
        })
    }
}

fn webpki(
    roots: Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .context("building the certificate verifier")
}

/// Accepts any certificate, but still checks that the server holds its key (the handshake
/// signatures), as libpq does for `require`: encryption against passive eavesdroppers only.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// webpki's verification, with `verify-ca`'s "any host name" and errors that say what to fix.
#[derive(Debug)]
struct Checked {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

/// A certificate problem, worded for the operator.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(text: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Refused(text),
    ))))
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let host = server_name.to_str();
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(verified) => Ok(verified),
            // webpki checks the chain before the name: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(
                error @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            )) => {
                let names = match &error {
                    CertificateError::NotValidForNameContext { presented, .. } => {
                        let names: Vec<&str> = presented.iter().map(|p| plain_name(p)).collect();
                        format!(" (it names {})", names.join(", "))
                    }
                    _ => String::new(),
                };
                Err(refused(format!(
                    "host name mismatch: the server's certificate is not valid for {host:?}{names}; \
                     sslmode=verify-full checks the host name: connect with a name the certificate lists, \
                     or reissue the certificate, or use sslmode=verify-ca"
                )))
            }
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                Err(refused(
                    "the server's certificate is not signed by a CA in sslrootcert: \
                     point sslrootcert at the CA (bundle) that issued it"
                        .to_string(),
                ))
            }
            Err(other) => Err(other),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl MakeTlsConnect<Socket> for MakeTls {
    type Stream = TlsStream;
    type TlsConnect = Connector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connector, io::Error> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a host name TLS can check"),
            )
        })?;
        Ok(Connector {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(TlsStream(Box::new(stream)))
        })
    }
}

/// An encrypted connection to Postgres.
pub struct TlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for TlsStream {
    /// No SCRAM channel binding: it needs the certificate's signature hash, and
    /// `channel_binding=prefer` (the default) falls back to plain SCRAM.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The TLS options taken out of a connection string, and the rest.
#[derive(Debug, Default, PartialEq)]
struct TlsOptions {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    /// Other `ssl*` options tokio-postgres does not know (refused with a message).
    others: Vec<(String, String)>,
}

fn is_tls_option(key: &str) -> bool {
    matches!(
        key,
        "sslmode" | "sslrootcert" | "sslcert" | "sslkey" | "sslpassword" | "sslcrl"
    )
}

fn take(options: &mut TlsOptions, key: String, value: String) {
    match key.as_str() {
        "sslmode" => options.sslmode = Some(value),
        "sslrootcert" => options.sslrootcert = Some(value),
        _ => options.others.push((key, value)),
    }
}

/// Splits the TLS options off a URL (`postgres://…?sslmode=…`) or `key=value` string.
fn split_tls_options(url: &str) -> anyhow::Result<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), options));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key)?;
            if is_tls_option(&key) {
                take(&mut options, key, percent_decode(value)?);
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, options));
    }
    // key=value form: values may be quoted ('a b') and escape with backslashes.
    let mut kept = Vec::new();
    let mut chars = url.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            anyhow::bail!("DATABASE_URL: expected `=` after {key:?}");
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.peek().copied() {
                None if quoted => anyhow::bail!("DATABASE_URL: unterminated quote in {key}"),
                None => break,
                Some((_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some((_, c)) if !quoted && c.is_whitespace() => break,
                Some((_, '\\')) => {
                    chars.next();
                    if let Some((_, c)) = chars.next() {
                        value.push(c);
                    }
                }
                Some((_, c)) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(url.len(), |(i, _)| *i);
        if is_tls_option(&key) {
            take(&mut options, key, value);
        } else {
            kept.push(&url[start..end]);
        }
    }
    Ok((kept.join(" "), options))
}

fn percent_decode(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .with_context(|| format!("DATABASE_URL: bad percent escape in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("DATABASE_URL: {text:?} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_out_of_urls() {
        let (rest, options) = split_tls_options(
            "postgres://u:p@db.example:5433/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("split");
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5433/app?application_name=x"
        );
        assert_eq!(options.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/ca.pem"));

        let (rest, options) =
            split_tls_options("postgres://localhost/app?sslmode=require").expect("split");
        assert_eq!(rest, "postgres://localhost/app");
        assert_eq!(options.sslmode.as_deref(), Some("require"));
    }

    #[test]
    fn tls_options_come_out_of_key_value_strings() {
        let (rest, options) = split_tls_options(
            "host=/tmp port=5432 sslmode = verify-ca sslrootcert='/my certs/ca.pem' password='it\\'s'",
        )
        .expect("split");
        assert_eq!(rest, "host=/tmp port=5432 password='it\\'s'");
        assert_eq!(options.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(options.sslrootcert.as_deref(), Some("/my certs/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().expect("the rest parses");
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
    }

    #[test]
    fn bad_tls_settings_say_what_to_fix() {
        let err = |url: &str| match Database::from_url(url) {
            Ok(_) => panic!("{url} should be refused"),
            Err(err) => format!("{err:#}"),
        };
        assert!(
            err("postgres://h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .contains("/nonexistent/ca.pem")
        );
        assert!(err("postgres://h/d?sslmode=allow").contains("sslmode=allow is not supported"));
        assert!(err("postgres://h/d?sslmode=require&sslrootcert=system")
            .contains("requires sslmode=verify-full"));
        assert!(err("postgres://h/d?sslcert=/c.pem").contains("sslcert"));
        if default_root_cert().is_none() {
            assert!(err("postgres://h/d?sslmode=verify-full").contains("add sslrootcert="));
        }
        let db = Database::from_url("postgres://h/d").expect("plain");
        assert_eq!(db.ssl_mode(), SslMode::Prefer, "libpq's default");
        assert_eq!(db.describe(), "h:5432");
    }
}
