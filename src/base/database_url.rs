//! Connection strings in the forms services already configure: libpq's URLs and key-value
//! strings, SQLAlchemy's `postgresql+DRIVER://` URLs, Django's schemes and JDBC URLs.
//!
//! Everything is turned into libpq's keywords, checked against what pglock can honour, and
//! then handed to tokio-postgres (and to [`tls`](crate::tls) for the TLS keywords). Nothing
//! here ever puts the connection string, or any part of it that may hold a password, into an
//! error message.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::base::error::{Error, Result};

/// A PostgreSQL connection string, read from any of the forms services configure, as libpq
/// keywords.
///
/// | form | example |
/// |---|---|
/// | libpq URL | `postgresql://app:secret@db:5432/shop?sslmode=require` |
/// | libpq key-value | `host=db port=5432 dbname=shop user=app password=secret` |
/// | SQLAlchemy | `postgresql+psycopg2://app:secret@db/shop`, `+psycopg`, `+asyncpg` (`?ssl=require`), `+pg8000` |
/// | Django (dj-database-url) | `postgres://…`, `pgsql://…`, `postgis://…` |
/// | JDBC | `jdbc:postgresql://db:5432/shop?user=app&password=secret&ssl=true` |
///
/// A `+DRIVER` suffix names the client library, not the server, and is dropped. Parameters
/// that mean the same under another name are mapped (asyncpg's `ssl`, JDBC's `ApplicationName`,
/// `connectTimeout`, `currentSchema`, `targetServerType`, …). Parameters that only tune the
/// named client library (JDBC's `prepareThreshold`, asyncpg's `prepared_statement_cache_size`)
/// are left out and listed by [`ignored`](Self::ignored). A parameter that pglock cannot honour
/// (a client certificate, a service file, GSSAPI encryption required) or does not know is
/// refused with [`Error::Config`] naming it.
///
/// Without a host, pglock connects through the Unix socket in `/var/run/postgresql`,
/// `/run/postgresql` or `/tmp` (the first that has the server's socket), else to `localhost`,
/// as libpq does. Without a user, it uses the `PGUSER`, `USER` or `LOGNAME` environment
/// variable.
///
/// `Display` and `Debug` never show the password.
///
/// ```
/// use pglock::DatabaseUrl;
///
/// let url: DatabaseUrl = "postgresql+asyncpg://app:s3cret@db.internal/shop?ssl=require".parse()?;
/// assert_eq!(url.get("sslmode"), Some("require"));
/// assert_eq!(url.get("dbname"), Some("shop"));
/// assert!(!url.to_string().contains("s3cret"));
///
/// let jdbc = pglock::DatabaseUrl::parse(
///     "jdbc:postgresql://db:5433/shop?user=app&password=s3cret&ApplicationName=billing",
/// )?;
/// assert_eq!(jdbc.get("port"), Some("5433"));
/// assert_eq!(jdbc.get("application_name"), Some("billing"));
/// # Ok::<(), pglock::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    params: Vec<(&'static str, String)>,
    form: UrlForm,
    ignored: Vec<String>,
    /// The string as given, with its passwords replaced by `***`.
    redacted: String,
}

/// How a [`DatabaseUrl`] was written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlForm {
    /// `postgres://` or `postgresql://` (libpq's URL, also Django's and SQLAlchemy's default).
    Url,
    /// `host=… dbname=…` (libpq's key-value string).
    KeyValue,
    /// `postgresql+DRIVER://` (SQLAlchemy), with the driver's name.
    SqlAlchemy {
        /// The client library the URL names: `psycopg2`, `psycopg`, `asyncpg`, `pg8000`, ….
        driver: String,
    },
    /// `pgsql://` or `postgis://` (dj-database-url's other schemes).
    Django,
    /// `jdbc:postgresql:` (Java).
    Jdbc,
}

impl fmt::Display for UrlForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlForm::Url => f.write_str("a libpq URL"),
            UrlForm::KeyValue => f.write_str("a libpq key-value string"),
            UrlForm::SqlAlchemy { driver } => write!(f, "a SQLAlchemy URL (driver {driver})"),
            UrlForm::Django => f.write_str("a Django URL"),
            UrlForm::Jdbc => f.write_str("a JDBC URL"),
        }
    }
}

/// The libpq keywords pglock passes on to tokio-postgres.
const DRIVER_KEYWORDS: [&str; 19] = [
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// The libpq keywords pglock's TLS support reads itself ([`tls`](crate::tls)).
pub(crate) const TLS_KEYWORDS: [&str; 2] = ["sslmode", "sslrootcert"];

/// What a keyword becomes.
enum Keyword {
    /// Kept, under this (libpq) name.
    Keep(&'static str),
    /// Dropped: it changes nothing pglock does with this value.
    Drop,
    /// Refused, for this reason.
    Refuse(String),
}

/// Reads a libpq keyword (after any renaming by the form) and its value.
fn libpq_keyword(key: &str, value: &str) -> Keyword {
    if let Some(keep) = DRIVER_KEYWORDS.iter().find(|k| **k == key) {
        return Keyword::Keep(keep);
    }
    let lower = value.to_ascii_lowercase();
    match key {
        "sslrootcert" => Keyword::Keep("sslrootcert"),
        // libpq's name for what tokio-postgres calls keepalives_retries.
        "keepalives_count" => Keyword::Keep("keepalives_retries"),
        "fallback_application_name" => Keyword::Keep("fallback_application_name"),
        "requiressl" => Keyword::Keep("requiressl"),
        "client_encoding" => match lower.replace(['-', '_'], "").as_str() {
            "utf8" | "unicode" | "auto" => Keyword::Drop,
            _ => Keyword::Refuse(
                "client_encoding: pglock always talks to the server in UTF8".to_owned(),
            ),
        },
        "gssencmode" => match lower.as_str() {
            "disable" | "prefer" | "allow" => Keyword::Drop,
            _ => Keyword::Refuse(
                "gssencmode=require: pglock cannot encrypt with GSSAPI; use sslmode instead"
                    .to_owned(),
            ),
        },
        // Obsolete in libpq, and no TLS library pglock uses compresses.
        "sslcompression" | "sslsni" => Keyword::Drop,
        "ssl_min_protocol_version" => match lower.as_str() {
            "tlsv1" | "tlsv1.1" | "tlsv1.2" => Keyword::Drop,
            _ => Keyword::Refuse(format!(
                "ssl_min_protocol_version={value}: pglock negotiates TLS 1.2 or 1.3 and cannot require more"
            )),
        },
        "ssl_max_protocol_version" => Keyword::Refuse(
            "ssl_max_protocol_version: pglock negotiates TLS 1.2 or 1.3 and cannot cap it"
                .to_owned(),
        ),
        "sslcert" | "sslkey" | "sslpassword" | "sslcertmode" => Keyword::Refuse(format!(
            "{key}: client certificate authentication is not supported by pglock"
        )),
        "sslcrl" | "sslcrldir" => Keyword::Refuse(format!(
            "{key}: certificate revocation lists are not supported by pglock"
        )),
        "service" | "servicefile" => Keyword::Refuse(format!(
            "{key}: pglock reads no connection service file; put the settings in the connection string"
        )),
        "passfile" => Keyword::Refuse(
            "passfile: pglock reads no password file; put the password in the connection string"
                .to_owned(),
        ),
        "krbsrvname" | "gsslib" | "gssdelegation" => Keyword::Refuse(format!(
            "{key}: Kerberos/GSSAPI authentication is not supported by pglock"
        )),
        "require_auth" => Keyword::Refuse(
            "require_auth: pglock cannot restrict the authentication methods".to_owned(),
        ),
        "replication" => Keyword::Refuse(
            "replication: a replication connection cannot take advisory locks".to_owned(),
        ),
        _ => Keyword::Refuse(format!("unknown connection parameter `{}`", printable(key))),
    }
}

/// A key as it may be shown: keys are names, but a malformed string may put anything there.
fn printable(key: &str) -> String {
    if key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        key.to_owned()
    } else {
        "(not shown)".to_owned()
    }
}

/// The parameters an SQLAlchemy driver reads itself from the URL's query, and what each becomes.
fn sqlalchemy_parameter(driver: &str, key: &str, value: &str) -> Option<Mapped> {
    let lower = value.to_ascii_lowercase();
    match (driver, key) {
        // asyncpg spells sslmode `ssl` (and also accepts `sslmode`).
        ("asyncpg", "ssl") => Some(match lower.as_str() {
            "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full" => {
                Mapped::To("sslmode", lower)
            }
            // Python's default SSL context checks the certificate and the host name.
            "true" | "1" | "on" => Mapped::To("sslmode", "verify-full".to_owned()),
            "false" | "0" | "off" => Mapped::To("sslmode", "disable".to_owned()),
            _ => Mapped::Refuse(format!("ssl={}: not an SSL mode", printable(value))),
        }),
        ("asyncpg", "timeout") | ("pg8000", "timeout") => {
            Some(Mapped::To("connect_timeout", seconds(value)))
        }
        ("pg8000", "tcp_keepalive") => Some(Mapped::To(
            "keepalives",
            if matches!(lower.as_str(), "false" | "0" | "off") {
                "0"
            } else {
                "1"
            }
            .to_owned(),
        )),
        (
            "asyncpg",
            "prepared_statement_cache_size"
            | "statement_cache_size"
            | "max_cached_statement_lifetime"
            | "max_cacheable_statement_size"
            | "command_timeout"
            | "direct_tls",
        )
        | ("pg8000", "ssl_context" | "socket_timeout")
        | (_, "async_fallback" | "executemany_mode" | "use_native_hstore") => Some(Mapped::Ignore),
        _ => None,
    }
}

/// What a form-specific parameter becomes.
enum Mapped {
    /// This libpq keyword, with this value.
    To(&'static str, String),
    /// Nothing: it tunes the client library only.
    Ignore,
    /// Refused, for this reason.
    Refuse(String),
}

/// A number of seconds, as libpq's timeouts take it: fractions are rounded up.
fn seconds(value: &str) -> String {
    match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => (secs.ceil() as u64).to_string(),
        _ => value.to_owned(),
    }
}

/// What a JDBC property becomes.
fn jdbc_property(key: &str, value: &str) -> Mapped {
    let lower = value.to_ascii_lowercase();
    match key {
        "user" => Mapped::To("user", value.to_owned()),
        "password" => Mapped::To("password", value.to_owned()),
        "sslmode" => Mapped::To("sslmode", value.to_owned()),
        "sslrootcert" => Mapped::To("sslrootcert", value.to_owned()),
        "options" => Mapped::To("options", value.to_owned()),
        // pgjdbc: ssl=true verifies the certificate and the host name unless sslmode says
        // otherwise.
        "ssl" => Mapped::To(
            "sslmode",
            if matches!(lower.as_str(), "false" | "0") {
                "disable"
            } else {
                "verify-full"
            }
            .to_owned(),
        ),
        "sslfactory" if value.ends_with("NonValidatingFactory") => {
            Mapped::To("sslmode", "require".to_owned())
        }
        "ApplicationName" => Mapped::To("application_name", value.to_owned()),
        "connectTimeout" | "loginTimeout" => Mapped::To("connect_timeout", seconds(value)),
        "tcpKeepAlive" => Mapped::To(
            "keepalives",
            if lower == "true" { "1" } else { "0" }.to_owned(),
        ),
        "currentSchema" => Mapped::To("options", format!("-c search_path={value}")),
        "loadBalanceHosts" => Mapped::To(
            "load_balance_hosts",
            if lower == "true" { "random" } else { "disable" }.to_owned(),
        ),
        "channelBinding" => Mapped::To("channel_binding", lower),
        "targetServerType" => match value {
            "any" => Mapped::To("target_session_attrs", "any".to_owned()),
            "primary" | "master" | "preferPrimary" => {
                Mapped::To("target_session_attrs", "read-write".to_owned())
            }
            _ => Mapped::Refuse(format!(
                "targetServerType={}: advisory locks must be taken on the primary",
                printable(value)
            )),
        },
        "gssEncMode" => match lower.as_str() {
            "disable" | "allow" | "prefer" => Mapped::Ignore,
            _ => Mapped::Refuse(
                "gssEncMode=require: pglock cannot encrypt with GSSAPI; use sslmode instead"
                    .to_owned(),
            ),
        },
        "sslcert" | "sslkey" | "sslpassword" | "sslpasswordcallback" | "sslfactory"
        | "sslfactoryarg" | "sslhostnameverifier" | "sslNegotiation" => Mapped::Refuse(format!(
            "{key}: this JDBC TLS setting is not supported by pglock; use sslmode and sslrootcert"
        )),
        "kerberosServerName" | "jaasApplicationName" | "jaasLogin" | "gsslib"
        | "useSpnego" => Mapped::Refuse(format!(
            "{key}: Kerberos/GSSAPI authentication is not supported by pglock"
        )),
        "replication" => Mapped::Refuse(
            "replication: a replication connection cannot take advisory locks".to_owned(),
        ),
        key if JDBC_DRIVER_ONLY.contains(&key) => Mapped::Ignore,
        _ => Mapped::Refuse(format!(
            "unknown JDBC property `{}` (pglock maps the ones that affect the connection and leaves out the driver's own)",
            printable(key)
        )),
    }
}

/// pgjdbc properties that tune the Java driver only.
const JDBC_DRIVER_ONLY: [&str; 39] = [
    "adaptiveFetch",
    "adaptiveFetchMaximum",
    "adaptiveFetchMinimum",
    "allowEncodingChanges",
    "assumeMinServerVersion",
    "autosave",
    "binaryTransfer",
    "binaryTransferDisable",
    "binaryTransferEnable",
    "cancelSignalTimeout",
    "cleanupSavepoints",
    "databaseMetadataCacheFields",
    "databaseMetadataCacheFieldsMiB",
    "defaultRowFetchSize",
    "disableColumnSanitiser",
    "escapeSyntaxCallMode",
    "groupStartupParameters",
    "hideUnprivilegedObjects",
    "hostRecheckSeconds",
    "logServerErrorDetail",
    "logUnclosedConnections",
    "loggerFile",
    "loggerLevel",
    "maxResultBuffer",
    "preferQueryMode",
    "prepareThreshold",
    "preparedStatementCacheQueries",
    "preparedStatementCacheSizeMiB",
    "protocolVersion",
    "quoteReturningIdentifiers",
    "readOnly",
    "readOnlyMode",
    "receiveBufferSize",
    "reWriteBatchedInserts",
    "sendBufferSize",
    "socketTimeout",
    "stringtype",
    "tcpNoDelay",
    "unknownLength",
];

impl DatabaseUrl {
    /// Reads `text` in any of the forms in the [type docs](Self).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a string in none of these forms, a malformed one, or a parameter
    /// that pglock cannot honour or does not know; the message names the parameter and never
    /// contains the password.
    pub fn parse(text: &str) -> Result<Self> {
        let read = Self::read(text)?;
        let redacted = read.redacted(text.trim());
        Ok(DatabaseUrl {
            redacted,
            ..read.url
        })
    }

    fn read(text: &str) -> Result<Read> {
        let text = text.trim();
        let fail =
            |reason: String| Error::Config(format!("cannot read the connection string: {reason}"));
        let mut out = Builder::default();
        let form = match scheme(text) {
            Some((scheme, rest)) => {
                let form = form_of(scheme).ok_or_else(|| {
                    fail(format!(
                        "`{}:` is not a PostgreSQL URL scheme; use postgresql://, postgres://, postgresql+DRIVER:// (SQLAlchemy) or jdbc:postgresql:// (Java)",
                        printable(scheme)
                    ))
                })?;
                let offset = text.len() - rest.len();
                match &form {
                    UrlForm::Jdbc => read_jdbc(rest, offset, &mut out),
                    _ => read_url(rest, offset, &form, &mut out),
                }
                .map_err(fail)?;
                form
            }
            None => {
                read_key_values(text, &mut out).map_err(fail)?;
                UrlForm::KeyValue
            }
        };
        out.finish(form).map_err(fail)
    }

    /// The value of libpq keyword `keyword` (`host`, `port`, `dbname`, `user`, `sslmode`, …),
    /// if the string sets it.
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| *k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// How the string was written.
    pub fn form(&self) -> &UrlForm {
        &self.form
    }

    /// The parameters left out because they only tune the client library the string was
    /// written for (JDBC's `prepareThreshold`, asyncpg's `prepared_statement_cache_size`).
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The string as libpq key-value pairs (`host='db' port='5432' …`), which
    /// [`Session::connect`](crate::Session::connect), [`tls::connect`](crate::tls::connect)
    /// and libpq itself accept.
    ///
    /// It contains the password: never print it; print the `DatabaseUrl` itself instead.
    pub fn to_conninfo(&self) -> String {
        conninfo(self.params.iter().map(|(k, v)| (*k, v.as_str())))
    }

    /// The connection settings for tokio-postgres, without the TLS keywords
    /// (`sslmode=verify-*` and `sslrootcert` need [`tls`](crate::tls)): `application_name`
    /// defaults to `pglock`, and a missing host or user is filled in as the [type docs](Self)
    /// say.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a value tokio-postgres refuses (a port that is not a number, an
    /// `sslmode` that needs [`tls`](crate::tls)); the message names the parameter.
    pub fn config(&self) -> Result<tokio_postgres::Config> {
        self.driver_config(false)
    }

    /// As [`config`](Self::config), leaving the TLS keywords to the caller when `tls_apart`.
    pub(crate) fn driver_config(&self, tls_apart: bool) -> Result<tokio_postgres::Config> {
        let kept = self
            .params
            .iter()
            .filter(|(k, _)| !(tls_apart && TLS_KEYWORDS.contains(k)))
            .filter(|(k, _)| *k != "sslrootcert")
            .map(|(k, v)| (*k, v.as_str()));
        let mut config =
            tokio_postgres::Config::from_str(&conninfo(kept)).map_err(|error| {
                // tokio-postgres names the option (never its value) in these errors.
                let hint = match self.get("sslmode") {
                    Some(mode) if !tls_apart && mode.starts_with("verify-") => {
                        "; sslmode=verify-ca/verify-full need pglock's `rustls` feature: connect with pglock::tls"
                    }
                    _ if !tls_apart && self.get("sslrootcert").is_some() => {
                        "; sslrootcert needs pglock's `rustls` feature: connect with pglock::tls"
                    }
                    _ => "",
                };
                Error::Config(format!(
                    "cannot use the connection string {self}: {error}{hint}"
                ))
            })?;
        if !tls_apart && self.get("sslrootcert").is_some() {
            return Err(Error::Config(
                "cannot use sslrootcert without pglock's `rustls` feature: connect with pglock::tls"
                    .to_owned(),
            ));
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            let port = config.get_ports().first().copied().unwrap_or(5432);
            match default_socket_dir(port) {
                #[cfg(unix)]
                Some(dir) => {
                    config.host_path(dir);
                }
                _ => {
                    config.host("localhost");
                }
            }
        }
        if config.get_user().is_none() {
            if let Some(user) = ["PGUSER", "USER", "LOGNAME"]
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            {
                config.user(user);
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("pglock");
        }
        Ok(config)
    }

    /// A one-line account of what the string says, password hidden, for logs:
    /// `host db, port 5432, database shop, user app, password given, sslmode require (from a
    /// SQLAlchemy URL (driver asyncpg))`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (keyword, label) in [
            ("host", "host"),
            ("hostaddr", "address"),
            ("port", "port"),
            ("dbname", "database"),
            ("user", "user"),
        ] {
            if let Some(value) = self.get(keyword) {
                parts.push(format!("{label} {value}"));
            }
        }
        if self.get("host").is_none() && self.get("hostaddr").is_none() {
            parts.insert(
                0,
                "host (default: the local socket or localhost)".to_owned(),
            );
        }
        parts.push(
            if self.get("password").is_some() {
                "password given (hidden)"
            } else {
                "no password"
            }
            .to_owned(),
        );
        for (keyword, value) in &self.params {
            if !matches!(
                *keyword,
                "host" | "hostaddr" | "port" | "dbname" | "user" | "password"
            ) {
                parts.push(format!("{keyword} {value}"));
            }
        }
        let mut text = format!("{} (read from {})", parts.join(", "), self.form);
        if !self.ignored.is_empty() {
            text.push_str(&format!(
                "; left out, as settings of the client library only: {}",
                self.ignored.join(", ")
            ));
        }
        text
    }
}

/// Libpq's default socket directories, in the order pglock looks for the server's socket.
#[cfg(unix)]
fn default_socket_dir(port: u16) -> Option<&'static str> {
    ["/var/run/postgresql", "/run/postgresql", "/tmp"]
        .into_iter()
        .find(|dir| std::path::Path::new(&format!("{dir}/.s.PGSQL.{port}")).exists())
}

#[cfg(not(unix))]
fn default_socket_dir(_port: u16) -> Option<&'static str> {
    None
}

impl FromStr for DatabaseUrl {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        DatabaseUrl::parse(text)
    }
}

/// The string as it was given, with the password replaced by `***` ([`redact_url`]).
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self
            .params
            .iter()
            .map(|(k, v)| (*k, if *k == "password" { "***" } else { v.as_str() }));
        f.debug_struct("DatabaseUrl")
            .field("form", &self.form)
            .field("conninfo", &conninfo(shown))
            .field("ignored", &self.ignored)
            .finish()
    }
}

/// Returns `url` with any password replaced by `***`, for messages and logs.
///
/// Handles every form [`DatabaseUrl`] reads. A string that cannot be read at all is not shown:
/// it may hold a password where no parser would look for one.
///
/// ```
/// assert_eq!(
///     pglock::redact_url("postgres://app:s3cret@db:5432/prod"),
///     "postgres://app:***@db:5432/prod"
/// );
/// assert_eq!(pglock::redact_url("host=db password=s3cret user=app"), "host=db password=*** user=app");
/// assert_eq!(
///     pglock::redact_url("jdbc:postgresql://db/prod?user=app&password=s3cret"),
///     "jdbc:postgresql://db/prod?user=app&password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let trimmed = url.trim();
    match DatabaseUrl::read(trimmed) {
        Ok(read) => read.redacted(trimmed),
        Err(_) => match scheme(trimmed) {
            Some((scheme, _)) => format!("{}:… (not shown: it cannot be read)", printable(scheme)),
            None => "(a connection string that cannot be read, not shown)".to_owned(),
        },
    }
}

/// A parsed string and where its password values are in the text.
struct Read {
    url: DatabaseUrl,
    password_spans: Vec<Range<usize>>,
}

impl Read {
    /// `text`, the string read, with `***` for each password.
    fn redacted(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for span in &self.password_spans {
            out.push_str(&text[at..span.start]);
            out.push_str("***");
            at = span.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// The parameters read so far.
#[derive(Default)]
struct Builder {
    params: Vec<(&'static str, String)>,
    ignored: Vec<String>,
    password_spans: Vec<Range<usize>>,
    /// Hosts given as separate `host` parameters (SQLAlchemy's multi-host form), each
    /// `host[:port]`.
    query_hosts: Vec<String>,
}

impl Builder {
    /// Sets libpq keyword `key`, replacing an earlier value (libpq keeps the last).
    fn set(&mut self, key: &'static str, value: String) {
        match self.params.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key, value)),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Takes a libpq keyword and its value.
    fn libpq(&mut self, key: &str, value: String) -> std::result::Result<(), String> {
        match libpq_keyword(key, &value) {
            Keyword::Keep(keyword) => {
                self.set(keyword, value);
                Ok(())
            }
            Keyword::Drop => Ok(()),
            Keyword::Refuse(reason) => Err(reason),
        }
    }

    fn mapped(&mut self, key: &str, mapped: Mapped) -> std::result::Result<(), String> {
        match mapped {
            Mapped::To(keyword, value) => {
                if keyword == "options" {
                    // currentSchema and options combine.
                    let value = match self.get("options") {
                        Some(before) => format!("{before} {value}"),
                        None => value,
                    };
                    self.set("options", value);
                    Ok(())
                } else {
                    self.libpq(keyword, value)
                }
            }
            Mapped::Ignore => {
                self.ignored.push(key.to_owned());
                Ok(())
            }
            Mapped::Refuse(reason) => Err(reason),
        }
    }

    fn finish(mut self, form: UrlForm) -> std::result::Result<Read, String> {
        if !self.query_hosts.is_empty() {
            let (hosts, ports): (Vec<String>, Vec<String>) = self
                .query_hosts
                .iter()
                .map(|entry| split_host_port(entry))
                .unzip();
            self.set("host", hosts.join(","));
            if ports.iter().any(|p| !p.is_empty()) {
                self.set("port", ports.join(","));
            }
        }
        // libpq: requiressl=1 is sslmode=require, unless sslmode is set.
        if let Some(pos) = self.params.iter().position(|(k, _)| *k == "requiressl") {
            let (_, value) = self.params.remove(pos);
            if self.get("sslmode").is_none() {
                let mode = if value == "1" { "require" } else { "prefer" };
                self.set("sslmode", mode.to_owned());
            }
        }
        if let Some(pos) = self
            .params
            .iter()
            .position(|(k, _)| *k == "fallback_application_name")
        {
            let (_, value) = self.params.remove(pos);
            if self.get("application_name").is_none() {
                self.set("application_name", value);
            }
        }
        Ok(Read {
            url: DatabaseUrl {
                params: self.params,
                form,
                ignored: self.ignored,
                redacted: String::new(),
            },
            password_spans: self.password_spans,
        })
    }
}

/// `host:port`, `[v6]:port`, `host` → `(host, port or "")`.
fn split_host_port(entry: &str) -> (String, String) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (
                host.to_owned(),
                after.strip_prefix(':').unwrap_or("").to_owned(),
            );
        }
    }
    match entry.rsplit_once(':') {
        // More than one colon: an IPv6 address without brackets, and no port.
        Some((host, port)) if !host.contains(':') => (host.to_owned(), port.to_owned()),
        _ => (entry.to_owned(), String::new()),
    }
}

/// `(scheme, rest after "scheme:")` when `text` starts with a URL scheme.
fn scheme(text: &str) -> Option<(&str, &str)> {
    let colon = text.find(':')?;
    let scheme = &text[..colon];
    let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    // A URL's scheme is followed by `//` (JDBC's by its subprotocol). Anything else is not a
    // URL (`user:password@host` misses its scheme), and is not shown.
    let rest = &text[colon + 1..];
    let url_like = rest.starts_with("//") || scheme.eq_ignore_ascii_case("jdbc");
    (valid && url_like).then_some((scheme, rest))
}

fn form_of(scheme: &str) -> Option<UrlForm> {
    let scheme = scheme.to_ascii_lowercase();
    match scheme.as_str() {
        "postgres" | "postgresql" => Some(UrlForm::Url),
        "pgsql" | "postgis" => Some(UrlForm::Django),
        "jdbc" => Some(UrlForm::Jdbc),
        _ => {
            let (base, driver) = scheme.split_once('+')?;
            (matches!(base, "postgres" | "postgresql") && !driver.is_empty()).then(|| {
                UrlForm::SqlAlchemy {
                    driver: driver.to_owned(),
                }
            })
        }
    }
}

/// Reads `//[user[:password]@][host[:port][,…]][/dbname][?key=value&…]`, the part of a URL
/// after its scheme's colon, which starts at byte `offset` of the whole string.
fn read_url(
    rest: &str,
    offset: usize,
    form: &UrlForm,
    out: &mut Builder,
) -> std::result::Result<(), String> {
    let Some(after) = rest.strip_prefix("//") else {
        return Err("expected `//` after the scheme".to_owned());
    };
    let offset = offset + 2;
    let (before_query, query) = match after.find('?') {
        Some(q) => (&after[..q], Some((&after[q + 1..], offset + q + 1))),
        None => (after, None),
    };
    // The last `@` before the query ends the user part, so that an unencoded `@` or `/` in a
    // password does not end it early.
    let (userinfo, host_and_path) = match before_query.rfind('@') {
        Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
        None => (None, before_query),
    };
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, password)) => {
                if !user.is_empty() {
                    out.set("user", decode(user, "the user name")?);
                }
                let start = offset + user.len() + 1;
                out.password_spans.push(start..start + password.len());
                out.set("password", decode(password, "the password")?);
            }
            None if !userinfo.is_empty() => out.set("user", decode(userinfo, "the user name")?),
            None => {}
        }
    }
    let (hosts, path) = match host_and_path.find('/') {
        Some(slash) => (&host_and_path[..slash], Some(&host_and_path[slash + 1..])),
        None => (host_and_path, None),
    };
    if !hosts.is_empty() {
        let mut names = Vec::new();
        let mut ports = Vec::new();
        for entry in hosts.split(',') {
            let (host, port) = split_host_port(entry);
            names.push(decode(&host, "a host")?);
            ports.push(decode(&port, "a port")?);
        }
        out.set("host", names.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            out.set("port", ports.join(","));
        }
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        out.set("dbname", decode(path, "the database name")?);
    }
    let Some((query, query_offset)) = query else {
        return Ok(());
    };
    let mut at = query_offset;
    for pair in query.split('&') {
        let pair_offset = at;
        at += pair.len() + 1;
        if pair.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key, "a parameter name")?;
        if key == "password" {
            let start = pair_offset + raw_key.len() + 1;
            out.password_spans.push(start..start + raw_value.len());
        }
        let value = decode(raw_value, &format!("the value of `{}`", printable(&key)))?;
        if key == "host" && matches!(form, UrlForm::SqlAlchemy { .. }) {
            // SQLAlchemy's multi-host form: `?host=a:5432&host=b:5433`.
            out.query_hosts.push(value);
            continue;
        }
        if let UrlForm::SqlAlchemy { driver } = form {
            if let Some(mapped) = sqlalchemy_parameter(driver, &key, &value) {
                out.mapped(&key, mapped)?;
                continue;
            }
        }
        out.libpq(&key, value)?;
    }
    Ok(())
}

/// Reads what follows `jdbc:`: `postgresql://host[:port][,…]/db?props`, `postgresql:db` or
/// `postgresql:/`.
fn read_jdbc(rest: &str, offset: usize, out: &mut Builder) -> std::result::Result<(), String> {
    let Some(after) = rest.strip_prefix("postgresql:") else {
        return Err("a JDBC URL for PostgreSQL starts with jdbc:postgresql:".to_owned());
    };
    let offset = offset + "postgresql:".len();
    let (target, query) = match after.find('?') {
        Some(q) => (&after[..q], Some((&after[q + 1..], offset + q + 1))),
        None => (after, None),
    };
    if let Some(hosts_and_db) = target.strip_prefix("//") {
        let (hosts, db) = hosts_and_db.split_once('/').unwrap_or((hosts_and_db, ""));
        let mut names = Vec::new();
        let mut ports = Vec::new();
        for entry in hosts.split(',').filter(|e| !e.is_empty()) {
            let (host, port) = split_host_port(entry);
            names.push(decode(&host, "a host")?);
            ports.push(if port.is_empty() {
                "5432".to_owned()
            } else {
                port
            });
        }
        if names.is_empty() {
            names.push("localhost".to_owned());
            ports.push("5432".to_owned());
        }
        out.set("host", names.join(","));
        out.set("port", ports.join(","));
        if !db.is_empty() {
            out.set("dbname", decode(db, "the database name")?);
        }
    } else {
        // jdbc:postgresql:database and jdbc:postgresql:/ connect to localhost:5432.
        out.set("host", "localhost".to_owned());
        out.set("port", "5432".to_owned());
        let db = target.trim_start_matches('/');
        if !db.is_empty() {
            out.set("dbname", decode(db, "the database name")?);
        }
    }
    let Some((query, query_offset)) = query else {
        return Ok(());
    };
    let mut at = query_offset;
    for pair in query.split('&') {
        let pair_offset = at;
        at += pair.len() + 1;
        if pair.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key, "a property name")?;
        if key == "password" {
            let start = pair_offset + raw_key.len() + 1;
            out.password_spans.push(start..start + raw_value.len());
        }
        let value = decode(raw_value, &format!("the value of `{}`", printable(&key)))?;
        out.mapped(&key, jdbc_property(&key, &value))?;
    }
    Ok(())
}

/// Reads libpq's key-value syntax: `key = value` pairs separated by spaces, values optionally
/// in single quotes with `\'` and `\\` escapes.
fn read_key_values(text: &str, out: &mut Builder) -> std::result::Result<(), String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_spaces(&mut i);
        if i >= bytes.len() {
            return Ok(());
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &text[key_start..i];
        skip_spaces(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not shown: text that is not a key=value pair may be anything, a password too.
            return Err(
                "it is neither a URL (postgresql://…) nor key=value pairs (expected `=` after a word)"
                    .to_owned(),
            );
        }
        i += 1;
        skip_spaces(&mut i);
        let value_start = i;
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        value.push(*bytes.get(i + 1).ok_or("unterminated quoted value")?);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                    None => return Err("unterminated quoted value".to_owned()),
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' {
                    value.push(*bytes.get(i + 1).ok_or("dangling backslash")?);
                    i += 2;
                } else {
                    value.push(bytes[i]);
                    i += 1;
                }
            }
        }
        if key == "password" {
            out.password_spans.push(value_start..i);
        }
        let value = String::from_utf8(value)
            .map_err(|_| format!("the value of `{}` is not UTF-8", printable(key)))?;
        out.libpq(key, value)?;
    }
}

/// Percent-decodes a URL component; `what` names it in errors (never its value).
fn decode(text: &str, what: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoding in {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} is not UTF-8 once decoded"))
}

/// Key-value pairs in libpq's syntax, every value quoted.
fn conninfo<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .map(|(key, value)| {
            let mut quoted = String::with_capacity(value.len() + 2);
            quoted.push('\'');
            for c in value.chars() {
                if c == '\'' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('\'');
            format!("{key}={quoted}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};

    fn parse(text: &str) -> DatabaseUrl {
        DatabaseUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn refused(text: &str) -> String {
        match DatabaseUrl::parse(text) {
            Ok(url) => panic!("{text} was accepted: {url:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn hosts(config: &tokio_postgres::Config) -> Vec<String> {
        config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            })
            .collect()
    }

    #[test]
    fn libpq_urls_and_key_values() {
        let url = parse("postgresql://app:p%40ss%2Fw@db.internal:5433/shop?sslmode=require&application_name=web");
        assert_eq!(url.form(), &UrlForm::Url);
        assert_eq!(url.get("password"), Some("p@ss/w"));
        assert_eq!(url.get("sslmode"), Some("require"));
        let config = url.config().unwrap();
        assert_eq!(hosts(&config), ["db.internal"]);
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_user(), Some("app"));
        assert_eq!(config.get_password(), Some(&b"p@ss/w"[..]));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(config.get_application_name(), Some("web"));

        let url =
            parse("host=db port = 5433 dbname=shop user=app password='a b\\'c' keepalives_count=4");
        assert_eq!(url.form(), &UrlForm::KeyValue);
        let config = url.config().unwrap();
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(config.get_keepalives_retries(), Some(4));
        assert_eq!(config.get_application_name(), Some("pglock"));

        // An unencoded `@` in the password: the last one ends the user part.
        let url = parse("postgres://app:p@ss@db/shop");
        assert_eq!(url.get("password"), Some("p@ss"));
        assert_eq!(url.get("host"), Some("db"));

        // Multiple hosts, IPv6, a socket directory percent-encoded as the host.
        let config = parse("postgresql://u@a:1,[::1]:2,c/db?target_session_attrs=read-write")
            .config()
            .unwrap();
        assert_eq!(hosts(&config), ["a", "::1", "c"]);
        assert_eq!(config.get_ports(), [1, 2, 5432]);
        assert_eq!(
            config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        let config = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/db")
            .config()
            .unwrap();
        assert_eq!(hosts(&config), ["/var/run/postgresql"]);
    }

    #[test]
    fn sqlalchemy_urls() {
        for driver in ["psycopg2", "psycopg", "asyncpg", "pg8000"] {
            let url = parse(&format!("postgresql+{driver}://app:pw@db:5432/shop"));
            assert_eq!(
                url.form(),
                &UrlForm::SqlAlchemy {
                    driver: driver.to_owned()
                }
            );
            let config = url.config().unwrap();
            assert_eq!(
                (config.get_user(), config.get_dbname()),
                (Some("app"), Some("shop"))
            );
        }
        // asyncpg spells sslmode `ssl`; its statement cache is its own business.
        let url =
            parse("postgresql+asyncpg://app@db/shop?ssl=require&prepared_statement_cache_size=0");
        assert_eq!(url.get("sslmode"), Some("require"));
        assert_eq!(url.ignored(), ["prepared_statement_cache_size"]);
        assert!(url.describe().contains("prepared_statement_cache_size"));
        assert_eq!(
            parse("postgresql+asyncpg://db/x?ssl=true").get("sslmode"),
            Some("verify-full")
        );
        // SQLAlchemy's multi-host form and a socket directory in the query.
        let config = parse("postgresql+psycopg2://u@/db?host=a:5433&host=b:5434")
            .config()
            .unwrap();
        assert_eq!(hosts(&config), ["a", "b"]);
        assert_eq!(config.get_ports(), [5433, 5434]);
        let config = parse("postgresql+psycopg2://u@/db?host=/var/run/postgresql")
            .config()
            .unwrap();
        assert_eq!(hosts(&config), ["/var/run/postgresql"]);
        // The driver's parameters are not passed to another driver's URL.
        assert!(refused("postgresql+psycopg2://db/x?ssl=require").contains("`ssl`"));
    }

    #[test]
    fn django_urls() {
        for scheme in ["postgres", "pgsql", "postgis"] {
            let config = parse(&format!("{scheme}://u:pw@db:5432/app"))
                .config()
                .unwrap();
            assert_eq!(config.get_dbname(), Some("app"));
        }
    }

    #[test]
    fn jdbc_urls() {
        let url = parse(
            "jdbc:postgresql://db:5433/shop?user=app&password=p%26w&ssl=true&ApplicationName=billing\
             &connectTimeout=7&currentSchema=sales&prepareThreshold=0&targetServerType=primary",
        );
        assert_eq!(url.form(), &UrlForm::Jdbc);
        assert_eq!(url.get("sslmode"), Some("verify-full"));
        assert_eq!(url.get("options"), Some("-c search_path=sales"));
        assert_eq!(url.ignored(), ["prepareThreshold"]);
        let config = url.driver_config(true).unwrap();
        assert_eq!(config.get_password(), Some(&b"p&w"[..]));
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(config.get_application_name(), Some("billing"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(
            config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        // sslmode wins over ssl=true when both are set, whichever comes first.
        assert_eq!(
            parse("jdbc:postgresql://db/x?sslmode=require").get("sslmode"),
            Some("require")
        );
        // Short forms: localhost:5432.
        let config = parse("jdbc:postgresql:shop").config().unwrap();
        assert_eq!(
            (hosts(&config), config.get_ports()),
            (vec!["localhost".to_owned()], &[5432][..])
        );
        assert_eq!(config.get_dbname(), Some("shop"));
        let config = parse("jdbc:postgresql://a,b:5433/x").config().unwrap();
        assert_eq!(hosts(&config), ["a", "b"]);
        assert_eq!(config.get_ports(), [5432, 5433]);
        assert!(refused("jdbc:postgresql://db/x?targetServerType=secondary").contains("primary"));
        assert!(refused("jdbc:postgresql://db/x?sslcert=/c.pem").contains("sslcert"));
        assert!(refused("jdbc:postgresql://db/x?fooBar=1").contains("`fooBar`"));
        assert!(refused("jdbc:mysql://db/x").contains("jdbc:postgresql:"));
    }

    #[test]
    fn parameters_that_cannot_be_honoured_are_named() {
        for (text, named) in [
            ("postgres://db/x?client_encoding=latin1", "client_encoding"),
            ("host=db gssencmode=require", "gssencmode"),
            ("postgres://db/x?sslcert=/c.pem", "sslcert"),
            ("host=db sslkey=/k.pem", "sslkey"),
            ("host=db service=prod", "service"),
            ("postgres://db/x?bogus=1", "`bogus`"),
            ("mysql://db/x", "`mysql:`"),
        ] {
            let message = refused(text);
            assert!(message.contains(named), "{text}: {message}");
        }
        // What changes nothing is accepted.
        parse("postgres://db/x?client_encoding=UTF8&gssencmode=disable&sslcompression=0");
        assert_eq!(
            parse("host=db requiressl=1").get("sslmode"),
            Some("require")
        );
    }

    #[test]
    fn no_message_contains_the_password() {
        let secret = "S3cretPw";
        for text in [
            "postgresql+asyncpg://root:S3cretPw@127.0.0.1/test?ssl=maybe",
            "postgresql+pg8000://root:S3cretPw@127.0.0.1/test?bogus=1",
            "postgres://root:S3cretPw@127.0.0.1:notaport/test",
            "postgres://root:S3cretPw%zz@127.0.0.1/test",
            "postgres:root:S3cretPw@127.0.0.1/test",
            "mysql://root:S3cretPw@127.0.0.1/test",
            "jdbc:postgresql://127.0.0.1/test?user=root&password=S3cretPw&sslcert=/x",
            "jdbc:postgresql://127.0.0.1:x/test?password=S3cretPw",
            "host=127.0.0.1 password=S3cretPw port=x",
            "host=127.0.0.1 password='S3cretPw and more' bogus=1",
            "host=127.0.0.1 password='S3cretPw",
            "S3cretPw",
            "root:S3cretPw@127.0.0.1/test",
        ] {
            let message = match DatabaseUrl::parse(text).and_then(|url| url.config()) {
                Ok(config) => panic!("{text} was accepted: {config:?}"),
                Err(error) => error.to_string(),
            };
            assert!(!message.contains(secret), "{text}: {message}");
            assert!(
                !redact_url(text).contains(secret),
                "{text}: {}",
                redact_url(text)
            );
        }
        for text in [
            "postgresql+psycopg2://root:S3cretPw@127.0.0.1:5999/test",
            "host=h password='S3cretPw and more' user=u",
            "jdbc:postgresql://h/db?password=S3cretPw&user=u",
            "postgres://h/db?password=S3cretPw",
        ] {
            let url = parse(text);
            for shown in [url.to_string(), format!("{url:?}"), url.describe()] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(url.to_conninfo().contains(secret));
        }
    }

    #[test]
    fn redacts_in_place() {
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?password=x&sslmode=require"),
            "postgres://h/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h:1/db?application_name=a"),
            "postgres://u:***@h:1/db?application_name=a"
        );
        assert_eq!(
            redact_url("user=u password=p host=h"),
            "user=u password=*** host=h"
        );
        assert_eq!(
            redact_url("user=u password='p q' host=h"),
            "user=u password=*** host=h"
        );
        assert_eq!(redact_url("postgres://u:p@h"), "postgres://u:***@h");
        assert_eq!(
            redact_url("postgresql+psycopg2://u:p@h/db"),
            "postgresql+psycopg2://u:***@h/db"
        );
    }
}
