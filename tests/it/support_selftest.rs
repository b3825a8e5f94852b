//! Self-tests of the fault-injection utilities in `support`.

use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio_postgres::{Client, Config, NoTls};

use crate::support::{process_alive, StopMode, TcpProxy, ThrowawayCluster};

/// Bound for anything that should be quick.
const QUICK: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio::time::timeout(QUICK, tokio_postgres::connect(url, NoTls))
        .await
        .expect("connect did not finish in time")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn connect_config(config: &Config) -> Client {
    let (client, connection) = tokio::time::timeout(QUICK, config.connect(NoTls))
        .await
        .expect("connect did not finish in time")
        .expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn select_int(client: &Client, n: i32) -> Result<i32, tokio_postgres::Error> {
    let row = client.query_one("SELECT $1::int4", &[&n]).await?;
    Ok(row.get(0))
}

async fn show(client: &Client, name: &str) -> String {
    let row = client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .expect("SHOW");
    row.get(0)
}

async fn backend_pid(client: &Client) -> i32 {
    let row = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid");
    row.get(0)
}

async fn backend_exists(client: &Client, pid: i32) -> bool {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .expect("pg_stat_activity");
    row.get::<_, i64>(0) == 1
}

/// Asserts that a query on `client` fails, and fast.
async fn assert_broken(client: &Client, what: &str) {
    let started = Instant::now();
    let result = tokio::time::timeout(QUICK, select_int(client, 1))
        .await
        .unwrap_or_else(|_| panic!("{what}: query on a broken connection hung"));
    assert!(result.is_err(), "{what}: query on old connection succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{what}: slow error"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_restart_breaks_old_connections_and_keeps_port() {
    let started = Instant::now();
    let cluster = ThrowawayCluster::start().await;
    eprintln!("cluster start: {:?}", started.elapsed());
    assert!(cluster.is_running());
    let port = cluster.port();

    let old = connect(&cluster.url()).await.expect("connect");
    assert_eq!(select_int(&old, 1).await.unwrap(), 1);

    for mode in [StopMode::Fast, StopMode::Immediate] {
        let started = Instant::now();
        cluster.restart(mode).await;
        eprintln!("restart ({mode:?}): {:?}", started.elapsed());
        assert!(cluster.is_running());
        assert_eq!(cluster.port(), port);
        assert_broken(&old, &format!("after restart {mode:?}")).await;
        let new = connect(&cluster.url())
            .await
            .expect("connect after restart");
        assert_eq!(select_int(&new, 7).await.unwrap(), 7);
    }

    let client = connect(&cluster.url()).await.expect("connect");
    cluster.stop(StopMode::Fast).await;
    assert!(!cluster.is_running());
    assert_broken(&client, "after stop").await;
    let started = Instant::now();
    let refused = connect(&cluster.url()).await;
    assert!(refused.is_err(), "connected to a stopped cluster");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Stopping again is a no-op.
    cluster.stop(StopMode::Immediate).await;

    let started = Instant::now();
    cluster.start_again().await;
    eprintln!("start_again: {:?}", started.elapsed());
    assert!(cluster.is_running());
    let client = connect(&cluster.url()).await.expect("connect");
    assert_eq!(select_int(&client, 3).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_drop_stops_server_and_removes_dir() {
    let cluster = ThrowawayCluster::start().await;
    let pid = cluster.postmaster_pid().expect("running");
    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("data").join("PG_VERSION").exists());
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(!process_alive(pid), "postmaster {pid} still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_cleaned_up_when_a_test_panics() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let cluster = ThrowawayCluster::start().await;
        let _ = tx.send((
            cluster.postmaster_pid().unwrap(),
            cluster.dir().to_path_buf(),
        ));
        panic!("deliberate panic with a running cluster");
    });
    let (pid, dir) = rx.await.expect("cluster info");
    let err = task.await.expect_err("task should panic");
    assert!(err.is_panic());
    assert!(!process_alive(pid), "postmaster {pid} survived the panic");
    assert!(!dir.exists(), "{} survived the panic", dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_builder_settings_and_ssl() {
    let cluster = ThrowawayCluster::builder()
        .setting("idle_session_timeout", "1s")
        .conf_line("application_name = 'from-conf'")
        .max_connections(20)
        .hba_line("host all nobody 127.0.0.1/32 reject")
        .ssl_self_signed()
        .start()
        .await;
    let cert = cluster.ssl_cert_path().expect("cert path");
    assert!(cert.exists());

    // The server speaks TLS with that certificate, which verifies as its
    // own root for 127.0.0.1.
    let out = tokio::time::timeout(
        QUICK,
        tokio::process::Command::new("openssl")
            .args(["s_client", "-starttls", "postgres", "-verify_return_error"])
            .args(["-verify_ip", "127.0.0.1", "-connect"])
            .arg(cluster.addr().to_string())
            .arg("-CAfile")
            .arg(cert)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("openssl s_client hung")
    .expect("run openssl s_client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "s_client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The extra pg_hba.conf line comes first.
    let mut nobody = cluster.pg_config();
    nobody.user("nobody");
    let Err(err) = nobody.connect(NoTls).await else {
        panic!("pg_hba.conf let nobody in");
    };
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("pg_hba.conf rejects"), "{err:?}");

    let mut config = cluster.pg_config();
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let client = connect_config(&config).await;
    assert_eq!(show(&client, "ssl").await, "on");
    assert_eq!(show(&client, "max_connections").await, "20");
    assert_eq!(show(&client, "idle_session_timeout").await, "1s");
    assert_eq!(show(&client, "fsync").await, "off");

    // The idle session timeout is in force: the server ends the session.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(select_int(&client, 1).await.is_err());
}

/// Run only as a child of `cluster_watchdog_cleans_up_after_kill`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "helper process for cluster_watchdog_cleans_up_after_kill"]
async fn watchdog_child_helper() {
    if std::env::var_os("PGLOCK_WATCHDOG_CHILD").is_none() {
        return;
    }
    let cluster = ThrowawayCluster::start().await;
    println!(
        "CLUSTER {} {}",
        cluster.postmaster_pid().expect("running"),
        cluster.dir().display()
    );
    // Wait to be killed; bounded in case nobody does.
    tokio::time::sleep(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_watchdog_cleans_up_after_kill() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = tokio::process::Command::new(exe)
        .args([
            "support_selftest::watchdog_child_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("PGLOCK_WATCHDOG_CHILD", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn helper");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read helper") {
            if line.starts_with("CLUSTER ") {
                return line;
            }
        }
        panic!("helper exited without starting a cluster");
    })
    .await
    .expect("helper did not start a cluster in time");
    let mut parts = line.split_whitespace().skip(1);
    let pid: u32 = parts.next().unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(parts.next().unwrap());
    assert!(process_alive(pid));

    child.kill().await.expect("kill helper"); // SIGKILL: no Drop runs

    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) || dir.exists() {
        assert!(
            Instant::now() < deadline,
            "watchdog did not clean up postmaster {pid} / {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_forwards_blackholes_and_heals() {
    let cluster = ThrowawayCluster::start().await;
    let proxy = TcpProxy::start(cluster.addr()).await;
    let url = cluster.url_with_port(proxy.port());

    let old = connect(&url).await.expect("connect via proxy");
    assert_eq!(select_int(&old, 1).await.unwrap(), 1);
    assert_eq!(proxy.connection_count(), 1);

    proxy.blackhole();
    assert!(proxy.is_blackholed());
    let hung = tokio::time::timeout(Duration::from_secs(1), select_int(&old, 1)).await;
    assert!(hung.is_err(), "SELECT 1 completed through a blackhole");
    // A new connection's startup hangs as well.
    let hung =
        tokio::time::timeout(Duration::from_secs(1), tokio_postgres::connect(&url, NoTls)).await;
    assert!(hung.is_err(), "connected through a blackhole");
    assert_eq!(proxy.connection_count(), 2); // accepted, held, still open

    proxy.heal();
    let new = connect(&url).await.expect("connect after heal");
    assert_eq!(select_int(&new, 2).await.unwrap(), 2);
    // The old connection survived: its held bytes were delivered late.
    let again = tokio::time::timeout(QUICK, select_int(&old, 3))
        .await
        .expect("old connection still hangs after heal");
    assert_eq!(again.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_reset_all_fails_client_fast_and_ends_backend() {
    let cluster = ThrowawayCluster::start().await;
    let direct = connect(&cluster.url()).await.expect("connect direct");
    let proxy = TcpProxy::start(cluster.addr()).await;
    let url = cluster.url_with_port(proxy.port());

    let client = connect(&url).await.expect("connect via proxy");
    let pid = backend_pid(&client).await;
    assert!(backend_exists(&direct, pid).await);

    proxy.reset_all().await;
    assert_eq!(proxy.connection_count(), 0);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(1), select_int(&client, 1))
        .await
        .expect("query after reset hung");
    assert!(result.is_err());
    eprintln!("error after reset_all: {:?}", started.elapsed());
    assert!(client.is_closed());

    // The server side got an RST too: its backend goes away.
    let deadline = Instant::now() + QUICK;
    while backend_exists(&direct, pid).await {
        assert!(Instant::now() < deadline, "backend {pid} still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The proxy keeps working for new connections.
    let client = connect(&url).await.expect("connect after reset");
    assert_eq!(select_int(&client, 4).await.unwrap(), 4);
    assert_eq!(proxy.accepted_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_refuse_new_keeps_existing_connections() {
    let cluster = ThrowawayCluster::start().await;
    let proxy = TcpProxy::start(cluster.addr()).await;
    let url = cluster.url_with_port(proxy.port());
    let existing = connect(&url).await.expect("connect via proxy");

    proxy.refuse_new(true).await;
    let started = Instant::now();
    let Err(err) = connect(&url).await else {
        panic!("connected while refusing");
    };
    assert!(started.elapsed() < Duration::from_secs(1));
    let refused = std::net::TcpStream::connect(proxy.addr()).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{err}"
    );
    assert_eq!(select_int(&existing, 5).await.unwrap(), 5);

    proxy.refuse_new(false).await;
    let client = connect(&url)
        .await
        .expect("connect after refuse_new(false)");
    assert_eq!(select_int(&client, 6).await.unwrap(), 6);
    assert!(proxy.wait_for_connection_count(2, QUICK).await);
}

/// Documents a limit of the proxy: it terminates TCP, so keepalive probes
/// are answered by the local kernel on both sides and a blackhole goes
/// unnoticed by TCP keepalives and TCP_USER_TIMEOUT, client- and server-side.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_blackhole_is_invisible_to_tcp_keepalives() {
    let cluster = ThrowawayCluster::builder()
        .setting("tcp_keepalives_idle", 1)
        .setting("tcp_keepalives_interval", 1)
        .setting("tcp_keepalives_count", 1)
        .setting("tcp_user_timeout", "1s")
        .start()
        .await;
    let direct = connect(&cluster.url()).await.expect("connect direct");
    let proxy = TcpProxy::start(cluster.addr()).await;

    let mut config = cluster.pg_config_with_port(proxy.port());
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(1))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(1)
        .tcp_user_timeout(Duration::from_secs(1));
    let client = connect_config(&config).await;
    let pid = backend_pid(&client).await;

    proxy.blackhole();
    let hung = tokio::time::timeout(Duration::from_secs(4), select_int(&client, 1)).await;
    assert!(hung.is_err(), "keepalive noticed the blackhole: {hung:?}");
    assert!(!client.is_closed());
    assert!(backend_exists(&direct, pid).await, "server dropped backend");

    proxy.heal();
    let result = tokio::time::timeout(QUICK, select_int(&client, 8))
        .await
        .expect("hangs after heal");
    assert_eq!(result.unwrap(), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_drop_closes_connections_and_listener() {
    let cluster = ThrowawayCluster::start().await;
    let proxy = TcpProxy::start(cluster.addr()).await;
    let addr = proxy.addr();
    let client = connect(&cluster.url_with_port(proxy.port()))
        .await
        .expect("connect via proxy");
    assert!(listens_here(addr), "the proxy listens on {addr}");
    proxy.blackhole(); // dropping must not wait for a heal
    drop(proxy);
    assert_broken(&client, "after proxy drop").await;
    // Whether the listener is closed is asked of this process's own sockets: connecting to the
    // address would prove nothing, as another test process may have been given the freed port.
    // The listener goes with the accept task, which the drop aborts: a worker thread drops the
    // task's future soon after, not during the drop.
    let dropped = Instant::now();
    while listens_here(addr) {
        assert!(
            dropped.elapsed() < QUICK,
            "the dropped proxy still listens on {addr} after {QUICK:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a socket of this process listens on `addr` (an IPv4 TCP address), by the socket
/// inodes of `/proc/self/fd` and the listening sockets of `/proc/net/tcp`.
fn listens_here(addr: std::net::SocketAddr) -> bool {
    let own: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = format!(":{:04X}", addr.port());
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, st (0A: LISTEN), inode
        fields.len() > 9
            && fields[1].ends_with(&port)
            && fields[3] == "0A"
            && own.contains(fields[9])
    })
}

/// The timeline the server writes WAL on now (a promotion starts a new one).
async fn timeline(client: &Client) -> i64 {
    let row = client
        .query_one(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn cluster_standby_streams_and_is_promoted() {
    let primary = ThrowawayCluster::builder().replication().start().await;
    let writer = connect(&primary.url()).await.unwrap();
    writer
        .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let standby = primary.start_standby(primary.port()).await;
    let reader = connect(&standby.url()).await.unwrap();
    let in_recovery: bool = reader
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "a standby");
    // Streaming: a later write reaches the standby.
    writer
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = reader
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Fail-over: the primary dies at once, the standby is promoted onto a new timeline.
    let old_timeline = timeline(&writer).await;
    primary.stop(StopMode::Immediate).await;
    standby.promote().await;
    let promoted = connect(&standby.url()).await.unwrap();
    let in_recovery: bool = promoted
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery, "promoted");
    promoted
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    assert!(timeline(&promoted).await > old_timeline);
}
