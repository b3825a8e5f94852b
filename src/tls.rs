//! TLS connections to PostgreSQL with rustls (feature `rustls`).
//!
//! Managed PostgreSQL services require TLS. This module reads the TLS settings of a connection
//! string the way libpq does and connects with [rustls](https://docs.rs/rustls) (the `ring`
//! provider, so no system library is needed):
//!
//! | `sslmode` | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (the default) | if the server offers it | no¹ |
//! | `require` | always | no¹ |
//! | `verify-ca` | always | signed by a trusted root |
//! | `verify-full` | always | signed by a trusted root **and** issued for the host connected to |
//!
//! ¹ As with libpq, naming root certificates explicitly (`sslrootcert` or
//! [`TlsConfig::root_certs`]) upgrades these modes to `verify-ca`. (`allow` tries TLS first,
//! like `prefer`: tokio-postgres has no plaintext-first mode.)
//!
//! Trusted roots (`sslrootcert`):
//!
//! - `sslrootcert=/path/to/ca.pem`: the PEM certificates in that file, and only those. This is
//!   what managed services document (Amazon RDS's global bundle, Azure's and Google Cloud SQL's
//!   server CA).
//! - `sslrootcert=system`: the operating system's trust store.
//! - not set: the Mozilla root program, built in ([webpki-roots](https://docs.rs/webpki-roots)),
//!   which covers services whose certificates come from a public CA (Let's Encrypt and
//!   the like). libpq would read `~/.postgresql/root.crt` instead; pglock does not.
//!
//! Client certificates (`sslcert`, `sslkey`) are not supported yet and are refused with
//! [`Error::Config`].
//!
//! Everything made here also sends its cancel requests (for abandoned waits) over TLS.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> pglock::Result<()> {
//! use pglock::{AdvisoryLock, AdvisoryLockGuard};
//!
//! let url = "postgres://app@db.example.com/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem";
//!
//! // A pool (each held lock keeps one connection):
//! let pool = pglock::tls::make_pool(url, 8)?;
//! let guard = AdvisoryLock::new(&pool, "nightly-report").lock().await?;
//! AdvisoryLockGuard::unlock(guard).await?;
//!
//! // Or one session shared by several locks:
//! let session = std::sync::Arc::new(pglock::tls::connect(url).await?);
//! let guard = AdvisoryLock::new(&session, "cache-refresh").try_lock().await?;
//! # drop(guard);
//! # Ok(()) }
//! ```

use std::fmt;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conn::session::Session;
use crate::conn::source::ConnectionSource;
use crate::database_url::DatabaseUrl;
use crate::error::{Error, Result};

/// libpq's `sslmode`: whether to use TLS and how far to trust the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it (tried first), certificate not checked.
    Allow,
    /// TLS if the server offers it, certificate not checked (the default).
    #[default]
    Prefer,
    /// TLS always, certificate not checked.
    Require,
    /// TLS always; the certificate must chain to a trusted root.
    VerifyCa,
    /// TLS always; the certificate must chain to a trusted root and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "unknown sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    fn for_driver(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Allow | SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }
}

/// Where the trusted root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RootCerts {
    /// The PEM certificates in this file (`sslrootcert=/path`).
    PemFile(PathBuf),
    /// These PEM certificates.
    Pem(Vec<u8>),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
    /// The Mozilla root program, built in (the default when `sslrootcert` is not set).
    WebPki,
}

/// A connection string's driver settings and TLS settings, ready to connect.
///
/// Made by [`from_url`](Self::from_url); [`connect`](Self::connect) gives a [`Session`],
/// [`pool`](Self::pool) a [`TlsPool`], and [`config`](Self::config) with
/// [`connector`](Self::connector) build anything else (your own deadpool `Manager`).
#[derive(Clone)]
pub struct TlsConfig {
    config: tokio_postgres::Config,
    mode: SslMode,
    roots: Option<RootCerts>,
    target: String,
    /// Whether the connection string named an `application_name`.
    named: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("target", &self.target)
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads a `postgres://` URL or a key-value connection string, including `sslmode` (all six
    /// libpq values) and `sslrootcert`. `application_name` defaults to `pglock`.
    ///
    /// ```
    /// use pglock::tls::{RootCerts, SslMode, TlsConfig};
    ///
    /// let tls = TlsConfig::from_url(
    ///     "postgres://app:secret@db.example.com/app?sslmode=verify-full&sslrootcert=/etc/db-ca.pem",
    /// )?;
    /// assert_eq!(tls.ssl_mode(), SslMode::VerifyFull);
    /// assert_eq!(tls.root_cert_source(), Some(&RootCerts::PemFile("/etc/db-ca.pem".into())));
    /// assert_eq!(tls.config().get_dbname(), Some("app"));
    ///
    /// let tls = TlsConfig::from_url("host=db.example.com user=app sslmode=require")?;
    /// assert_eq!(tls.ssl_mode(), SslMode::Require);
    /// # Ok::<(), pglock::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a malformed string, an unknown `sslmode`, or a client certificate
    /// setting (`sslcert`, `sslkey`, `sslpassword`: not supported yet). Messages never contain
    /// the password.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_database_url(&DatabaseUrl::parse(url)?)
    }

    /// As [`from_url`](Self::from_url), for a string already read.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`from_url`](Self::from_url).
    pub fn from_database_url(url: &DatabaseUrl) -> Result<Self> {
        let mode = match url.get("sslmode") {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::default(),
        };
        let roots = url.get("sslrootcert").map(|value| match value {
            "system" => RootCerts::System,
            path => RootCerts::PemFile(PathBuf::from(path)),
        });
        let mut config = url.driver_config(true)?;
        // As libpq: sslmode counts for TCP connections only; PostgreSQL never speaks TLS on a
        // Unix socket.
        let unix_only = !config.get_hosts().is_empty()
            && config.get_hostaddrs().is_empty()
            && config.get_hosts().iter().all(is_unix_socket);
        config.ssl_mode(if unix_only {
            tokio_postgres::config::SslMode::Disable
        } else {
            mode.for_driver()
        });
        Ok(TlsConfig {
            config,
            mode,
            roots,
            target: url.to_string(),
            named: url.get("application_name").is_some(),
        })
    }

    /// Sets `application_name`, replacing the connection string's.
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.config.application_name(name);
        self
    }

    /// Sets `application_name` unless the connection string names one (the default default
    /// is `pglock`).
    pub fn with_default_application_name(mut self, name: &str) -> Self {
        if !self.named {
            self.config.application_name(name);
        }
        self
    }

    /// The driver configuration, to change other settings (timeouts, keepalives). Its
    /// `sslmode` is pglock's to keep in step: change it with
    /// [`with_ssl_mode`](Self::with_ssl_mode).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Turns an error from connecting with this configuration's [`connector`](Self::connector)
    /// into [`Error::Tls`] when TLS failed, or [`Error::Connect`] otherwise, for connections
    /// made by hand.
    pub fn connect_error(&self, error: tokio_postgres::Error) -> Error {
        Error::connect(&self.target, error)
    }

    /// Sets the trusted root certificates, replacing `sslrootcert`. With `require` or lower
    /// modes this also turns certificate checking on, as `verify-ca`.
    pub fn root_certs(mut self, roots: RootCerts) -> Self {
        self.roots = Some(roots);
        self
    }

    /// Sets the `sslmode`, replacing the connection string's.
    pub fn with_ssl_mode(mut self, mode: SslMode) -> Self {
        self.mode = mode;
        self.config.ssl_mode(mode.for_driver());
        self
    }

    /// The `sslmode` in effect.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// The root certificates named explicitly, if any (else the default applies).
    pub fn root_cert_source(&self) -> Option<&RootCerts> {
        self.roots.as_ref()
    }

    /// The driver configuration: everything but the TLS settings, with the driver's `sslmode`
    /// set to match.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS connector for tokio-postgres and deadpool, verifying as the `sslmode` says.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if the root certificates cannot be read or contain no certificate.
    pub fn connector(&self) -> Result<TlsConnector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify = match (self.mode, &self.roots) {
            (SslMode::VerifyFull, _) => Verify::Full,
            (SslMode::VerifyCa, _) | (_, Some(_)) => Verify::Ca,
            _ => Verify::Nothing,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(EncryptOnly(provider.clone())),
            Verify::Ca | Verify::Full => {
                let roots = self.load_roots()?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| {
                            Error::Config(format!("cannot use the root certificates: {e}"))
                        })?;
                if verify == Verify::Full {
                    webpki
                } else {
                    Arc::new(CaOnly(webpki))
                }
            }
        };
        let versions: &[&SupportedProtocolVersion] = rustls::DEFAULT_VERSIONS;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| Error::Config(format!("cannot configure TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // PostgreSQL 17 checks the ALPN protocol; earlier servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(TlsConnector {
            rustls: MakeRustlsConnect::new(config),
            plain_only: self.config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable,
        })
    }

    fn load_roots(&self) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        let source = self.roots.clone().unwrap_or(RootCerts::WebPki);
        let read_error = |what: &str, e: &dyn fmt::Display| {
            Error::Config(format!(
                "cannot read the root certificates from {what}: {e}"
            ))
        };
        match &source {
            RootCerts::WebPki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            RootCerts::System => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
            }
            RootCerts::PemFile(path) => {
                let what = path.display().to_string();
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| read_error(&what, &e))?
                {
                    let cert = cert.map_err(|e| read_error(&what, &e))?;
                    store.add(cert).map_err(|e| read_error(&what, &e))?;
                }
            }
            RootCerts::Pem(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| read_error("PEM data", &e))?;
                    store.add(cert).map_err(|e| read_error("PEM data", &e))?;
                }
            }
        }
        if store.is_empty() {
            return Err(Error::Config(format!(
                "no root certificate found in {source:?}: sslrootcert must name a PEM file with the CA certificate"
            )));
        }
        Ok(store)
    }

    /// Connects one [`Session`], whose cancel requests also go over TLS.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] when TLS cannot be set up (an untrusted certificate, a host name the
    /// certificate does not name, a server without TLS), [`Error::Connect`] for other
    /// connection failures, [`Error::Config`] as [`connector`](Self::connector).
    pub async fn connect(&self) -> Result<Session> {
        let tls = self.connector()?;
        Session::connect_config(self.config.clone(), tls)
            .await
            .map_err(|error| Error::connect(&self.target, error))
    }

    /// A deadpool pool of at most `max_size` TLS connections, ready for
    /// [`AdvisoryLock::new`](crate::AdvisoryLock::new).
    ///
    /// The pool connects lazily: a TLS failure shows on the first acquisition, as
    /// [`Error::Tls`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`connector`](Self::connector).
    pub fn pool(&self, max_size: usize) -> Result<TlsPool> {
        let tls = self.connector()?;
        let manager = Manager::from_config(
            self.config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        Ok(TlsPool {
            pool,
            tls,
            target: self.target.clone(),
        })
    }
}

/// Connects one [`Session`] to `url` with TLS as its `sslmode` says; see the
/// [module docs](self).
///
/// # Errors
///
/// As [`TlsConfig::from_url`] and [`TlsConfig::connect`].
pub async fn connect(url: &str) -> Result<Session> {
    TlsConfig::from_url(url)?.connect().await
}

/// A pool of at most `max_size` connections to `url` with TLS as its `sslmode` says; see the
/// [module docs](self).
///
/// # Errors
///
/// As [`TlsConfig::from_url`] and [`TlsConfig::pool`].
pub fn make_pool(url: &str, max_size: usize) -> Result<TlsPool> {
    TlsConfig::from_url(url)?.pool(max_size)
}

/// A deadpool pool of TLS connections that sends cancel requests over TLS too.
///
/// Pass it (or a reference) wherever pglock takes a pool; it derefs to the
/// [`deadpool_postgres::Pool`] for everything else.
#[derive(Clone)]
pub struct TlsPool {
    pool: Pool,
    tls: TlsConnector,
    target: String,
}

impl TlsPool {
    /// The underlying pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The TLS connector, for [`ConnectionSource::with_cancel_tls`] and the like.
    pub fn connector(&self) -> &TlsConnector {
        &self.tls
    }

    /// Takes a connection from the pool, reporting TLS failures as [`Error::Tls`].
    ///
    /// # Errors
    ///
    /// [`Error::Tls`], [`Error::Connect`], [`Error::PoolExhausted`] or [`Error::Pool`].
    pub async fn get(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(source) => Error::connect(&self.target, source),
            other => Error::from(other),
        })
    }
}

impl Deref for TlsPool {
    type Target = Pool;

    fn deref(&self) -> &Pool {
        &self.pool
    }
}

impl fmt::Debug for TlsPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPool")
            .field("target", &self.target)
            .field("status", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl From<&TlsPool> for ConnectionSource {
    fn from(pool: &TlsPool) -> Self {
        ConnectionSource::from(pool.pool.clone()).with_cancel_tls(pool.tls.clone())
    }
}

impl From<TlsPool> for ConnectionSource {
    fn from(pool: TlsPool) -> Self {
        ConnectionSource::from(&pool)
    }
}

#[cfg(unix)]
fn is_unix_socket(host: &tokio_postgres::config::Host) -> bool {
    matches!(host, tokio_postgres::config::Host::Unix(_))
}

#[cfg(not(unix))]
fn is_unix_socket(_host: &tokio_postgres::config::Host) -> bool {
    false
}

/// The TLS connector of a [`TlsConfig`], for tokio-postgres and deadpool: rustls, verifying as
/// the `sslmode` says.
///
/// tokio-postgres asks a connector for a TLS session before it knows whether it will use one,
/// with an empty host name when it connects through a Unix socket. Where the configuration
/// never uses TLS (`sslmode=disable`, or Unix sockets only, where PostgreSQL speaks no TLS),
/// this connector accepts that; elsewhere an empty host name fails, as with rustls alone.
#[derive(Clone)]
pub struct TlsConnector {
    rustls: MakeRustlsConnect,
    plain_only: bool,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("plain_only", &self.plain_only)
            .finish_non_exhaustive()
    }
}

impl<S> MakeTlsConnect<S> for TlsConnector
where
    MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(
        &mut self,
        hostname: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        // Never used when no TLS is asked for: any valid name serves.
        let hostname = if hostname.is_empty() && self.plain_only {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<S>::make_tls_connect(&mut self.rustls, hostname)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Ca,
    Full,
}

/// `require` without root certificates: encrypt, accept any certificate (libpq's behaviour),
/// but still check that the server holds the certificate's key.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct CaOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name, so a name error means the chain is trusted.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_client_certificates_and_bad_modes() {
        for url in [
            "postgres://h/db?sslcert=/c.pem",
            "host=h sslkey=/k.pem",
            "postgres://h/db?sslmode=verify",
        ] {
            assert!(
                matches!(TlsConfig::from_url(url), Err(Error::Config(_))),
                "{url}"
            );
        }
        let error = TlsConfig::from_url("postgres://u:secret@h/db?sslcert=/c.pem").unwrap_err();
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn modes_map_to_the_driver() {
        use tokio_postgres::config::SslMode as Driver;
        for (value, driver) in [
            ("disable", Driver::Disable),
            ("allow", Driver::Prefer),
            ("prefer", Driver::Prefer),
            ("require", Driver::Require),
            ("verify-ca", Driver::Require),
            ("verify-full", Driver::Require),
        ] {
            let tls = TlsConfig::from_url(&format!("postgres://h/db?sslmode={value}")).unwrap();
            assert_eq!(tls.config().get_ssl_mode(), driver, "{value}");
        }
        let tls = TlsConfig::from_url("postgres://h/db").unwrap();
        assert_eq!(tls.ssl_mode(), SslMode::Prefer);
        assert_eq!(tls.config().get_application_name(), Some("pglock"));
    }

    #[test]
    fn default_application_name_yields_to_the_url() {
        let tls = TlsConfig::from_url("postgres://h/db?sslmode=require")
            .unwrap()
            .with_default_application_name("pglock run x");
        assert_eq!(tls.config().get_application_name(), Some("pglock run x"));
        for url in [
            "postgres://h/db?application_name=mine",
            "host=h application_name=mine",
        ] {
            let tls = TlsConfig::from_url(url)
                .unwrap()
                .with_default_application_name("pglock run x");
            assert_eq!(tls.config().get_application_name(), Some("mine"), "{url}");
            let tls = tls.with_application_name("forced");
            assert_eq!(tls.config().get_application_name(), Some("forced"), "{url}");
        }
    }

    #[test]
    fn missing_root_file_is_a_config_error() {
        let tls = TlsConfig::from_url(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap();
        let error = tls.connector().expect_err("no such file");
        assert!(matches!(error, Error::Config(_)), "{error}");
        assert!(
            TlsConfig::from_url("postgres://h/db?sslmode=verify-full")
                .unwrap()
                .connector()
                .is_ok(),
            "built-in roots"
        );
    }
}
