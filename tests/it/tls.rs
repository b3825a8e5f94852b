//! TLS (feature `rustls`) against a throwaway cluster with `ssl = on`, a certificate authority
//! and a server certificate made here with the openssl command line tool.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pglock::tls::{RootCerts, SslMode, TlsConfig};
use pglock::{AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, Error, Session, TlsFailure};
use rand::Rng;

use crate::harness::TestDb;
use crate::support::ThrowawayCluster;

/// A test certificate authority, a server certificate it signed for `localhost` and
/// `127.0.0.1`, and an unrelated second authority; removed on drop.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = std::env::temp_dir().join(format!(
            "pglock-tls-{}-{:08x}",
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let certs = Certificates { dir };
        certs.authority("ca", "pglock test CA");
        certs.authority("other-ca", "pglock unrelated CA");
        certs.openssl(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            certs.dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        certs.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ]);
        // PostgreSQL wants its key private to the user it runs as.
        let key = certs.path("server.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            for file in ["server.key", "server.crt"] {
                let status = Command::new("chown")
                    .arg("postgres")
                    .arg(certs.path(file))
                    .status()
                    .unwrap();
                assert!(status.success(), "chown {file}");
            }
        }
        certs
    }

    fn authority(&self, name: &str, common_name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={common_name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A cluster that accepts TLS connections only, with the test certificates.
async fn tls_cluster(certs: &Certificates) -> ThrowawayCluster {
    let quoted = |path: &Path| format!("'{}'", path.display());
    ThrowawayCluster::builder()
        .conf_line("ssl = on")
        .conf_line(format!(
            "ssl_cert_file = {}",
            quoted(&certs.path("server.crt"))
        ))
        .conf_line(format!(
            "ssl_key_file = {}",
            quoted(&certs.path("server.key"))
        ))
        .hba_line("hostnossl all all 127.0.0.1/32 reject")
        .start()
        .await
}

/// A URL for the cluster: `host` is what the certificate is checked against, the connection
/// itself always goes to 127.0.0.1.
fn url(cluster: &ThrowawayCluster, host: &str, app: &str, tls: &str) -> String {
    format!(
        "postgres://postgres@{host}:{}/postgres?hostaddr=127.0.0.1&application_name={app}&{tls}",
        cluster.port()
    )
}

async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The leak check of the throwaway cluster: no session of this test holds or awaits an
/// advisory lock there.
async fn assert_no_locks_on(cluster: &ThrowawayCluster, app: &str) {
    let admin = pglock::tls::connect(&url(
        cluster,
        "localhost",
        "pglock-admin",
        "sslmode=require",
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE l.locktype = 'advisory' AND a.application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} advisory locks leaked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn verify_full_connects_sessions_and_pools() {
    let db = TestDb::new("tls_verify_full").await;
    let certs = Certificates::make();
    let cluster = tls_cluster(&certs).await;
    let ca = certs.path("ca.crt");
    let tls_params = format!("sslmode=verify-full&sslrootcert={}", ca.display());

    // A session, by host name.
    let session = Arc::new(
        pglock::tls::connect(&url(&cluster, "localhost", &db.app, &tls_params))
            .await
            .expect("verify-full against the right CA and host name"),
    );
    assert!(uses_tls(&session).await);
    let key = db.key();
    for _ in 0..2 {
        let guard = AdvisoryLock::new(&session, key).lock().await.unwrap();
        AdvisoryLockGuard::unlock(guard).await.unwrap();
    }
    // Verified as direct through the TLS connection's cancel key (src/backend.rs).
    assert_eq!(
        crate::harness::prepared_lock_statements(session.client()).await,
        (3, 3)
    );

    // A pool, by IP address (the certificate names 127.0.0.1 as well).
    let pool =
        pglock::tls::make_pool(&url(&cluster, "127.0.0.1", &db.app, &tls_params), 2).unwrap();
    let lock = AdvisoryLock::new(&pool, key);
    let guard = lock.lock().await.unwrap();
    assert!(uses_tls(&guard).await);
    assert!(lock.try_lock().await.unwrap().is_none());
    drop(guard);
    let guard = lock
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("released on drop");
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    // Root certificates given in code instead of the URL.
    let config = TlsConfig::from_url(&url(&cluster, "localhost", &db.app, "sslmode=verify-full"))
        .unwrap()
        .root_certs(RootCerts::Pem(std::fs::read(&ca).unwrap()));
    let other = config.connect().await.expect("PEM roots given in code");
    assert!(uses_tls(&other).await);

    drop((session, pool, other));
    assert_no_locks_on(&cluster, &db.app).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn verification_failures_are_typed() {
    let db = TestDb::new("tls_failures").await;
    let certs = Certificates::make();
    let cluster = tls_cluster(&certs).await;
    let ca = certs.path("ca.crt").display().to_string();
    let other_ca = certs.path("other-ca.crt").display().to_string();

    let expect_failure = |result: pglock::Result<Session>, expected: TlsFailure| match result {
        Err(error @ Error::Tls { failure, .. }) if failure == expected => error.to_string(),
        Err(other) => panic!("expected a TLS error ({expected:?}), got {other:?}: {other}"),
        Ok(_) => panic!("expected a TLS error ({expected:?}), connected"),
    };

    // A certificate signed by another authority than the trusted one.
    let message = expect_failure(
        pglock::tls::connect(&url(
            &cluster,
            "localhost",
            &db.app,
            &format!("sslmode=verify-full&sslrootcert={other_ca}"),
        ))
        .await,
        TlsFailure::UntrustedCertificate,
    );
    assert!(message.contains("sslrootcert"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert!(
        message.contains(&format!("{}", cluster.port())),
        "{message}"
    );

    // The built-in public roots do not trust the test authority either.
    expect_failure(
        pglock::tls::connect(&url(&cluster, "localhost", &db.app, "sslmode=verify-full")).await,
        TlsFailure::UntrustedCertificate,
    );

    // The right authority, but a host name the certificate does not name.
    let message = expect_failure(
        pglock::tls::connect(&url(
            &cluster,
            "db.pglock.invalid",
            &db.app,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ))
        .await,
        TlsFailure::HostnameMismatch,
    );
    assert!(message.contains("verify-ca"), "{message}");

    // verify-ca checks the authority only, so the same host name passes...
    let session = pglock::tls::connect(&url(
        &cluster,
        "db.pglock.invalid",
        &db.app,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca ignores the host name");
    assert!(uses_tls(&session).await);
    // ...but not the wrong authority.
    expect_failure(
        pglock::tls::connect(&url(
            &cluster,
            "localhost",
            &db.app,
            &format!("sslmode=verify-ca&sslrootcert={other_ca}"),
        ))
        .await,
        TlsFailure::UntrustedCertificate,
    );

    // A pool reports the same on its first acquisition.
    let pool = pglock::tls::make_pool(
        &url(
            &cluster,
            "localhost",
            &db.app,
            &format!("sslmode=verify-full&sslrootcert={other_ca}"),
        ),
        1,
    )
    .unwrap();
    match pool.get().await {
        Err(Error::Tls {
            failure: TlsFailure::UntrustedCertificate,
            ..
        }) => {}
        other => panic!("expected UntrustedCertificate from the pool, got {other:?}"),
    }
    match AdvisoryLock::new(&pool, db.key()).lock().await {
        Err(Error::Tls {
            failure: TlsFailure::UntrustedCertificate,
            ..
        }) => {}
        other => panic!("expected UntrustedCertificate from an acquisition, got {other:?}"),
    }

    drop(session);
    assert_no_locks_on(&cluster, &db.app).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let db = TestDb::new("tls_require").await;
    let certs = Certificates::make();
    let cluster = tls_cluster(&certs).await;

    // libpq's require: encrypted, any certificate accepted.
    let tls = TlsConfig::from_url(&url(&cluster, "localhost", &db.app, "sslmode=require")).unwrap();
    assert_eq!(tls.ssl_mode(), SslMode::Require);
    let session = tls
        .connect()
        .await
        .expect("require accepts the certificate");
    assert!(uses_tls(&session).await);

    // ...unless root certificates are named, which makes it verify-ca (as libpq does).
    let other_ca = certs.path("other-ca.crt").display().to_string();
    let result = pglock::tls::connect(&url(
        &cluster,
        "localhost",
        &db.app,
        &format!("sslmode=require&sslrootcert={other_ca}"),
    ))
    .await;
    assert!(
        matches!(
            result,
            Err(Error::Tls {
                failure: TlsFailure::UntrustedCertificate,
                ..
            })
        ),
        "{result:?}"
    );

    // prefer (the default) uses TLS when offered; disable is refused by this server's
    // pg_hba.conf (hostnossl ... reject), which is a login error, not a TLS one.
    let session = pglock::tls::connect(&url(&cluster, "localhost", &db.app, "sslmode=prefer"))
        .await
        .unwrap();
    assert!(uses_tls(&session).await);
    let refused =
        pglock::tls::connect(&url(&cluster, "localhost", &db.app, "sslmode=disable")).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");

    drop(session);
    assert_no_locks_on(&cluster, &db.app).await;
    db.assert_no_locks().await;
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_typed() {
    let db = TestDb::new("tls_no_server_tls").await;
    let cluster = ThrowawayCluster::builder()
        .setting("ssl", "off")
        .start()
        .await;
    let result =
        pglock::tls::connect(&url(&cluster, "localhost", &db.app, "sslmode=require")).await;
    match result {
        Err(
            error @ Error::Tls {
                failure: TlsFailure::ServerWithoutTls,
                ..
            },
        ) => assert!(error.to_string().contains("sslmode"), "{error}"),
        other => panic!("expected ServerWithoutTls, got {other:?}"),
    }
    // prefer falls back to a plain connection.
    let session = pglock::tls::connect(&url(&cluster, "localhost", &db.app, "sslmode=prefer"))
        .await
        .unwrap();
    assert!(!uses_tls(&session).await);
    drop(session);
    db.assert_no_locks().await;
}

/// An abandoned wait on a TLS session is cancelled on the server (the cancel request goes
/// over TLS as well), and the session stays usable.
#[tokio::test]
async fn abandoned_wait_is_cancelled_over_tls() {
    let db = TestDb::new("tls_cancel").await;
    let certs = Certificates::make();
    let cluster = tls_cluster(&certs).await;
    let tls_params = format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.path("ca.crt").display()
    );
    let target = url(&cluster, "localhost", &db.app, &tls_params);
    let key = AdvisoryKey::Single(rand::thread_rng().gen());

    let pool = pglock::tls::make_pool(&target, 2).unwrap();
    let holder = AdvisoryLock::new(&pool, key).lock().await.unwrap();
    // Dedicated: its wait queues on the server (a shared session would poll).
    let session = Arc::new(pglock::tls::connect(&target).await.unwrap().dedicated());
    let waiter = AdvisoryLock::new(&session, key);

    let waiting_pid: i32 = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Poll until the wait is queued on the server, then drop it.
    let observer = pglock::tls::connect(&target).await.unwrap();
    let mut wait = Box::pin(waiter.lock());
    let queued = async {
        loop {
            let waiting: bool = observer
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
                    &[&waiting_pid],
                )
                .await
                .unwrap()
                .get(0);
            if waiting {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        result = &mut wait => panic!("granted while held: {result:?}"),
        () = queued => {}
    }
    drop(wait);

    // The cancel reaches the server: the session's wait ends without closing the session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: bool = observer
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
                &[&waiting_pid],
            )
            .await
            .unwrap()
            .get(0);
        if !waiting {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the wait was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(holder);
    let guard = waiter
        .try_lock_for(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the session is usable after the cancellation");
    assert_eq!(AdvisoryLockGuard::backend_pid(&guard), waiting_pid);
    AdvisoryLockGuard::unlock(guard).await.unwrap();

    drop((session, pool, observer));
    assert_no_locks_on(&cluster, &db.app).await;
    db.assert_no_locks().await;
}

/// The `pglock` command connects with TLS as the URL says, and reports a failed verification
/// as "cannot connect" (exit 69) with the reason.
#[cfg(feature = "cli")]
#[tokio::test]
async fn the_command_uses_tls() {
    let db = TestDb::new("tls_cli").await;
    let certs = Certificates::make();
    let cluster = tls_cluster(&certs).await;
    let run = |url: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pglock"))
            .args(["run", "--database-url", &url, "tls-cli-test", "--", "true"])
            .env_remove("DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run pglock")
    };
    let ca = certs.path("ca.crt").display().to_string();
    let other_ca = certs.path("other-ca.crt").display().to_string();

    let ok = run(url(
        &cluster,
        "localhost",
        &db.app,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(
        ok.status.success(),
        "{:?}: {}",
        ok.status,
        String::from_utf8_lossy(&ok.stderr)
    );

    let refused = run(url(
        &cluster,
        "localhost",
        &db.app,
        &format!("sslmode=verify-full&sslrootcert={other_ca}"),
    ))
    .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("not signed by a trusted certificate authority"),
        "{stderr}"
    );

    assert_no_locks_on(&cluster, &db.app).await;
    db.assert_no_locks().await;
}
