//! Throwaway PostgreSQL clusters for fault-injection tests.
//!
//! Each [`ThrowawayCluster`] is a private PostgreSQL server in its own
//! temporary directory, listening on `127.0.0.1` on a port of its own, with
//! trust authentication for the superuser `postgres`. Tests can stop it,
//! start it again on the same port, or restart it, which the shared server
//! on port 5432 must never be subjected to.
//!
//! # Speed
//!
//! `initdb` runs at most once per template key (PostgreSQL binaries and this
//! module's settings), into a directory of its own under the cluster base
//! directory (`/dev/shm`, see [`cluster_base_dir`]); every cluster is then a
//! `cp -a` of that template into `/dev/shm` (tmpfs). Nothing the server
//! reads lives under the checkout or its `target/`: a checkout in a private
//! home directory (mode 0700) is out of reach of the `postgres` user. The template is
//! published with an atomic `rename`, so parallel test processes (cargo
//! nextest runs one process per test) share it safely; two processes that
//! race on a cold cache may both run `initdb`, and one copy is dropped.
//!
//! Measured on the 2-core dev machine (PostgreSQL 15):
//!
//! | step | time |
//! | --- | --- |
//! | `initdb` into the template (cold cache only) | ~0.75 s |
//! | copy of the template (39 MB, ~1000 files) to tmpfs | ~0.07–0.12 s (~0.8 s onto ext4, hence tmpfs) |
//! | `pg_ctl start -w` | ~0.12 s (pg_ctl polls every 100 ms) |
//! | warm [`ThrowawayCluster::start`] in total | ~0.2–0.26 s |
//! | [`ThrowawayCluster::restart`], `Fast` or `Immediate` | ~0.22–0.32 s |
//! | [`ThrowawayCluster::start_again`] | ~0.12 s |
//! | `Drop` (immediate stop + remove) | ~0.1 s |
//!
//! Set `PGLOCK_TEST_TIMING=1` to have `start` print its timings to stderr.
//!
//! # Cleanup
//!
//! `Drop` stops the server with `pg_ctl stop -m immediate` and removes the
//! directory, also while a test panics. If the test process is killed
//! outright (a nextest timeout, SIGKILL), `Drop` never runs; for that case
//! every cluster has a small watchdog process in its own process group that
//! waits for the test process to go away (its stdin pipe reaches EOF) and
//! then stops the server and removes the directory.
//!
//! # Privileges
//!
//! `initdb` and `postgres` refuse to run as root. When the tests run as
//! root, the server binaries run as the `postgres` OS user through
//! `runuser`, and the cluster directory is owned by that user. As any other
//! user they run directly. The binaries are taken from `PGLOCK_PG_BINDIR`,
//! else `/usr/lib/postgresql/15/bin` when it exists, else from `PATH`.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// OS user that owns the cluster files and runs the server when we are root.
const PG_OS_USER: &str = "postgres";
/// Database superuser created by `initdb`.
const SUPERUSER: &str = "postgres";
/// Bumped whenever the template's `initdb` options change.
const TEMPLATE_VERSION: u32 = 1;
/// Upper bound for one `pg_ctl` invocation (it also gets `-t` of this).
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How to stop the server, as `pg_ctl stop -m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Terminate sessions, roll back, checkpoint, exit cleanly.
    Fast,
    /// Kill every process at once, as in a crash: the next start runs
    /// crash recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Options for a [`ThrowawayCluster`], made by [`ThrowawayCluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    conf_lines: Vec<String>,
    hba_lines: Vec<String>,
    ssl: bool,
    max_connections: u32,
    replication: bool,
    /// The network namespace to run in, and the address to listen on there.
    namespace: Option<(String, Ipv4Addr)>,
}

impl ClusterBuilder {
    /// Adds a raw line to `postgresql.conf` (after the defaults, so it wins),
    /// e.g. `"idle_session_timeout = '2s'"`.
    pub fn conf_line(mut self, line: impl Into<String>) -> Self {
        self.conf_lines.push(line.into());
        self
    }

    /// Adds `name = 'value'` to `postgresql.conf`.
    pub fn setting(self, name: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string().replace('\'', "''");
        self.conf_line(format!("{name} = '{value}'"))
    }

    /// Adds a line to `pg_hba.conf` *before* the default trust lines, so it
    /// is matched first, e.g. `"hostnossl all all 127.0.0.1/32 reject"`.
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// Turns on `ssl` with a fresh self-signed certificate for `localhost`
    /// and `127.0.0.1` (made with the `openssl` command line tool). Its path
    /// is [`ThrowawayCluster::ssl_cert_path`]; it can serve as a root
    /// certificate on the client side.
    pub fn ssl_self_signed(mut self) -> Self {
        self.ssl = true;
        self
    }

    /// Makes the cluster a primary that standbys can stream from
    /// ([`ThrowawayCluster::start_standby`]): `wal_level = replica` and WAL
    /// senders (`initdb -A trust` already lets 127.0.0.1 replicate).
    pub fn replication(mut self) -> Self {
        self.replication = true;
        self
    }

    /// Runs the server inside `namespace`, listening on its end of the link only: clients
    /// reach it over the link ([`ThrowawayCluster::url`]), or through its Unix socket, which a
    /// cut link does not affect ([`ThrowawayCluster::socket_config`]).
    pub fn in_namespace(mut self, namespace: &super::NetworkNamespace) -> Self {
        self.namespace = Some((namespace.name().to_owned(), namespace.inside_addr()));
        // Clients on this host come from its end of the link.
        self.hba_line(format!("host all all {}/32 trust", namespace.host_addr()))
    }

    /// Sets `max_connections` (default 50).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Creates the cluster and starts the server. Panics (with the server
    /// log) when that fails; whatever was created is cleaned up.
    pub async fn start(self) -> ThrowawayCluster {
        let t0 = Instant::now();
        let prepared = tokio::task::spawn_blocking(move || ThrowawayCluster::prepare(self))
            .await
            .expect("cluster preparation panicked");
        let t1 = Instant::now();
        prepared.start_first().await;
        if std::env::var_os("PGLOCK_TEST_TIMING").is_some() {
            eprintln!("TIMING prepare {:?} start {:?}", t1 - t0, t1.elapsed());
        }
        prepared
    }
}

/// A private PostgreSQL server in a temporary directory; see the module docs.
#[derive(Debug)]
pub struct ThrowawayCluster {
    /// Temporary directory: holds `data/`, the unix socket, `server.log`.
    dir: PathBuf,
    data: PathBuf,
    port: std::sync::atomic::AtomicU16,
    ssl_cert: Option<PathBuf>,
    /// Serialises stop/start so concurrent callers cannot interleave pg_ctl.
    lifecycle: tokio::sync::Mutex<()>,
    /// The address the server listens on (127.0.0.1 unless in a namespace).
    host: Ipv4Addr,
    /// The network namespace the server runs in, if any.
    namespace: Option<String>,
    /// Stops the server and removes `dir` if this process dies without Drop.
    watchdog: Mutex<Option<Child>>,
}

impl ThrowawayCluster {
    /// Starts a cluster with the default settings.
    pub async fn start() -> ThrowawayCluster {
        Self::builder().start().await
    }

    /// Options for a cluster; finish with [`ClusterBuilder::start`].
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            conf_lines: Vec::new(),
            hba_lines: Vec::new(),
            ssl: false,
            max_connections: 50,
            replication: false,
            namespace: None,
        }
    }

    /// The TCP port the server listens on (stays the same across restarts).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// `127.0.0.1:port` (the namespace's address when in one), e.g. as the target of a
    /// `TcpProxy`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.port()))
    }

    /// A `tokio_postgres::Config` for the superuser through the server's Unix socket.
    pub fn socket_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port())
            .user(SUPERUSER)
            .dbname("postgres");
        config
    }

    /// Connection URL for the superuser, database `postgres`.
    pub fn url(&self) -> String {
        self.url_with_port(self.port())
    }

    /// The same URL but for another port on 127.0.0.1, e.g. a proxy's.
    pub fn url_with_port(&self, port: u16) -> String {
        format!("postgres://{SUPERUSER}@{}:{port}/postgres", self.host)
    }

    /// A `tokio_postgres::Config` equivalent to [`url`](Self::url), to be
    /// adjusted further (timeouts, keepalives, application name).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        self.pg_config_with_port(self.port())
    }

    /// [`pg_config`](Self::pg_config) for another port on 127.0.0.1, e.g. a
    /// proxy's. (Calling `.port()` on a config *adds* a port, so it cannot
    /// be changed afterwards.)
    pub fn pg_config_with_port(&self, port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host.to_string())
            .port(port)
            .user(SUPERUSER)
            .dbname("postgres");
        config
    }

    /// The temporary directory (holds `data/`, the unix socket and the log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The self-signed certificate, when built with `ssl_self_signed`.
    pub fn ssl_cert_path(&self) -> Option<&Path> {
        self.ssl_cert.as_deref()
    }

    /// The server log so far (empty if unreadable); handy in assertion
    /// messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// PID of the running postmaster, if any.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        process_alive(pid).then_some(pid)
    }

    /// Whether the postmaster is running (its pid file names a live process).
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Stops the server and waits until it is gone. No-op if not running.
    pub async fn stop(&self, mode: StopMode) {
        let _guard = self.lifecycle.lock().await;
        self.stop_locked(mode).await;
    }

    /// Starts the stopped server again on the same port and waits until it
    /// accepts connections. No-op if it is running.
    pub async fn start_again(&self) {
        let _guard = self.lifecycle.lock().await;
        self.start_again_locked().await;
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again), on the
    /// same port. Every existing connection is broken.
    pub async fn restart(&self, mode: StopMode) {
        let _guard = self.lifecycle.lock().await;
        self.stop_locked(mode).await;
        self.start_again_locked().await;
    }

    /// Starts a streaming standby of this cluster (built with
    /// [`ClusterBuilder::replication`]): `pg_basebackup -R` into a directory of
    /// its own, on a port of its own. It streams from `127.0.0.1:from_port`:
    /// this cluster's port, or a proxy's in front of it, which lets a test cut
    /// the standby off (asynchronous replication that falls behind).
    pub async fn start_standby(&self, from_port: u16) -> ThrowawayCluster {
        let standby = tokio::task::spawn_blocking(move || {
            let dir = make_temp_dir();
            let data = dir.join("data");
            let cluster = ThrowawayCluster {
                dir: dir.clone(),
                data: data.clone(),
                port: std::sync::atomic::AtomicU16::new(0),
                ssl_cert: None,
                lifecycle: tokio::sync::Mutex::new(()),
                host: Ipv4Addr::LOCALHOST,
                namespace: None,
                watchdog: Mutex::new(None),
            };
            base_backup(&dir, &data, from_port);
            // The copied configuration names the primary's socket directory.
            append_lines(
                &data.join("postgresql.conf"),
                &[format!("unix_socket_directories = '{}'", dir.display())],
            );
            *cluster.watchdog.lock().unwrap() = Some(spawn_watchdog(&dir, &data));
            cluster
        })
        .await
        .expect("standby preparation panicked");
        standby.start_first().await;
        standby
    }

    /// Turns this stopped former primary into a standby of the server at
    /// `127.0.0.1:from_port`, on the same port, as fail-over tools rebuild an
    /// old primary: its data directory is replaced by a fresh `pg_basebackup
    /// -R`, and it is started again.
    pub async fn rejoin_as_standby(&self, from_port: u16) {
        let _guard = self.lifecycle.lock().await;
        self.stop_locked(StopMode::Immediate).await;
        let (dir, data, port) = (self.dir.clone(), self.data.clone(), self.port());
        tokio::task::spawn_blocking(move || {
            let mut remove = Command::new("rm");
            remove.arg("-rf").arg(&data);
            let out = run_sync(remove);
            assert!(out.status.success(), "rm -rf data: {}", describe(&out));
            base_backup(&dir, &data, from_port);
            append_lines(
                &data.join("postgresql.conf"),
                &[
                    format!("unix_socket_directories = '{}'", dir.display()),
                    format!("port = {port}"),
                ],
            );
        })
        .await
        .expect("rebuilding the standby panicked");
        self.start_again_locked().await;
    }

    /// Promotes this standby to a primary (`pg_ctl promote -w`): it leaves
    /// recovery and starts a new timeline.
    pub async fn promote(&self) {
        let _guard = self.lifecycle.lock().await;
        let mut cmd = pg_command("pg_ctl");
        cmd.current_dir(&self.dir)
            .arg("promote")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-s", "-t"])
            .arg(PG_CTL_TIMEOUT.as_secs().to_string());
        let out = run_async(cmd).await;
        assert!(
            out.status.success(),
            "pg_ctl promote: {}\n{}",
            describe(&out),
            self.log_tail()
        );
    }

    async fn stop_locked(&self, mode: StopMode) {
        if !self.is_running() {
            return;
        }
        let mut cmd = pg_command("pg_ctl");
        cmd.current_dir(&self.dir)
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode.as_arg(), "-w", "-s", "-t"])
            .arg(PG_CTL_TIMEOUT.as_secs().to_string());
        let out = run_async(cmd).await;
        if !out.status.success() && self.is_running() {
            panic!(
                "pg_ctl stop -m {} failed: {}\n{}",
                mode.as_arg(),
                describe(&out),
                self.log_tail()
            );
        }
    }

    async fn start_again_locked(&self) {
        if self.is_running() {
            return;
        }
        // The port could have been taken in the meantime (unlikely: it is
        // outside the ephemeral range); retry for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.pg_ctl_start().await {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline && port_in_use_error(&self.log()) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(msg) => panic!("{msg}"),
            }
        }
    }

    /// `pg_ctl start -w`; on failure returns a message with the log tail.
    async fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = pg_command("pg_ctl");
        cmd.current_dir(&self.dir)
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-s", "-t"])
            .arg(PG_CTL_TIMEOUT.as_secs().to_string());
        if let Some(namespace) = &self.namespace {
            // The postmaster inherits the namespace of the pg_ctl that starts it.
            cmd = super::netns::wrap(namespace, &cmd);
        }
        let out = run_async(cmd).await;
        if out.status.success() && self.is_running() {
            return Ok(());
        }
        // pg_ctl may give up while the postmaster still starts: stop it so
        // it cannot linger.
        if self.is_running() {
            let _ = self.stop_sync(StopMode::Immediate);
        }
        Err(format!(
            "pg_ctl start failed (port {}): {}\n{}",
            self.port(),
            describe(&out),
            self.log_tail()
        ))
    }

    /// First start: pick a port, retry with another one if it was taken.
    async fn start_first(&self) {
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = pick_port();
            self.port.store(port, Ordering::SeqCst);
            append_lines(
                &self.data.join("postgresql.conf"),
                &[format!("port = {port}")],
            );
            match self.pg_ctl_start().await {
                Ok(()) => return,
                Err(msg) if port_in_use_error(&self.log()) => {
                    last_err = msg;
                    // Later lines of the log would otherwise still match.
                    let _ = std::fs::write(self.dir.join("server.log"), b"");
                }
                Err(msg) => panic!("{msg}"),
            }
        }
        panic!("could not find a free port for the cluster: {last_err}");
    }

    /// Everything before the first start; blocking.
    fn prepare(builder: ClusterBuilder) -> ThrowawayCluster {
        let template = template_data_dir();
        let dir = make_temp_dir();
        let data = dir.join("data");
        // From here on Drop removes `dir`.
        let mut cluster = ThrowawayCluster {
            dir: dir.clone(),
            data: data.clone(),
            port: std::sync::atomic::AtomicU16::new(0),
            ssl_cert: None,
            lifecycle: tokio::sync::Mutex::new(()),
            host: builder
                .namespace
                .as_ref()
                .map_or(Ipv4Addr::LOCALHOST, |(_, addr)| *addr),
            namespace: builder.namespace.as_ref().map(|(name, _)| name.clone()),
            watchdog: Mutex::new(None),
        };

        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&template).arg(&data);
        let out = run_sync(cp);
        assert!(out.status.success(), "cp -a template: {}", describe(&out));

        let mut conf = vec![
            "# added by ThrowawayCluster".to_string(),
            format!("listen_addresses = '{}'", cluster.host),
            format!("unix_socket_directories = '{}'", dir.display()),
            format!("max_connections = {}", builder.max_connections),
            "shared_buffers = '8MB'".to_string(),
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = off".to_string(),
            "autovacuum = off".to_string(),
        ];
        if builder.replication {
            conf.extend([
                "wal_level = replica".to_string(),
                "max_wal_senders = 10".to_string(),
                "wal_keep_size = '64MB'".to_string(),
                "hot_standby = on".to_string(),
            ]);
        } else {
            conf.extend([
                "max_wal_senders = 0".to_string(),
                "wal_level = minimal".to_string(),
            ]);
        }
        if builder.ssl {
            let (cert, key) = make_self_signed_cert(&dir);
            conf.push("ssl = on".to_string());
            conf.push(format!("ssl_cert_file = '{}'", cert.display()));
            conf.push(format!("ssl_key_file = '{}'", key.display()));
            cluster.ssl_cert = Some(cert);
        }
        conf.extend(builder.conf_lines);
        append_lines(&data.join("postgresql.conf"), &conf);

        if !builder.hba_lines.is_empty() {
            let hba_path = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba_path).expect("read pg_hba.conf");
            let mut new = builder.hba_lines.join("\n");
            new.push('\n');
            new.push_str(&old);
            std::fs::write(&hba_path, new).expect("write pg_hba.conf");
        }

        *cluster.watchdog.lock().unwrap() = Some(spawn_watchdog(&dir, &data));
        cluster
    }

    fn stop_sync(&self, mode: StopMode) -> std::process::Output {
        let mut cmd = pg_command("pg_ctl");
        cmd.current_dir("/")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode.as_arg(), "-w", "-s", "-t"])
            .arg(PG_CTL_TIMEOUT.as_secs().to_string());
        run_sync(cmd)
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(30);
        let mut out = String::from("--- server.log (tail) ---\n");
        for line in &lines[start..] {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.stop_sync(StopMode::Immediate);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(mut child) = self.watchdog.lock().ok().and_then(|mut w| w.take()) {
            // Closing its stdin lets the watchdog run (now a no-op) and exit.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// Watchdog: waits for EOF on stdin (this process closed it or died), then
/// stops the server and removes the directory. Own process group, so a
/// signal to the test's process group does not take it down too.
fn spawn_watchdog(dir: &Path, data: &Path) -> Child {
    let pg_ctl = pg_command("pg_ctl");
    let mut stop = vec![pg_ctl.get_program().to_os_string()];
    stop.extend(pg_ctl.get_args().map(|a| a.to_os_string()));
    let script = r#"read -r _ignored; "$@" stop -D "$DATA" -m immediate -w -s -t 30 >/dev/null 2>&1; rm -rf "$DIR""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("pglock-cluster-watchdog")
        .args(stop)
        .env("DATA", data)
        .env("DIR", dir)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn cluster watchdog")
}

/// Directory of the PostgreSQL server binaries.
fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGLOCK_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
        if debian.join("pg_ctl").exists() {
            return debian;
        }
        PathBuf::new()
    })
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| running_user_id() == 0)
}

/// A command for a PostgreSQL binary, run as `postgres` when we are root.
fn pg_command(name: &str) -> Command {
    let bin = if bindir().as_os_str().is_empty() {
        PathBuf::from(name)
    } else {
        bindir().join(name)
    };
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.env("LC_ALL", "C")
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .stdin(Stdio::null());
    cmd
}

fn chown_to_pg_user(path: &Path) {
    if !running_as_root() {
        return;
    }
    let mut cmd = Command::new("chown");
    cmd.arg("-R").arg(format!("{PG_OS_USER}:")).arg(path);
    let out = run_sync(cmd);
    assert!(
        out.status.success(),
        "chown {}: {}",
        path.display(),
        describe(&out)
    );
}

/// Where cluster directories go: `PGLOCK_TEST_TMPDIR`, else `/dev/shm`
/// (tmpfs: copying the ~1000 template files there takes ~0.07 s, versus
/// ~0.8 s onto the ext4 disk of the dev machine), else the system temp dir.
fn cluster_base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGLOCK_TEST_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    let usable = std::fs::metadata(shm)
        .map(|m| m.is_dir() && m.permissions().mode() & 0o1777 == 0o1777)
        .unwrap_or(false);
    if usable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh, empty directory for one cluster (short path: the unix socket
/// lives in it and socket paths are limited to ~107 bytes).
fn make_temp_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = cluster_base_dir();
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nonce: u32 = rand::random();
        let dir = base.join(format!("pglock-pg-{}-{n}-{nonce:08x}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .expect("chmod temp dir");
                chown_to_pg_user(&dir);
                return dir;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
    panic!("could not create a temp dir under {}", base.display());
}

/// The template data directory, created by `initdb` on first use.
fn template_data_dir() -> PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(create_template).clone()
}

/// The directory that holds the templates: one per user running the tests, traversable by the
/// `postgres` user (who owns each template inside it), under the cluster base directory.
fn template_root() -> PathBuf {
    let me = running_user_id();
    let root = cluster_base_dir().join(format!("pglock-pg-templates-{me}"));
    match std::fs::create_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("create {}: {e}", root.display()),
    }
    let meta = std::fs::symlink_metadata(&root).expect("stat template root");
    assert!(
        meta.is_dir() && meta.uid() == me,
        "{} is not a directory of this user's",
        root.display()
    );
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .expect("chmod template root");
    root
}

/// The uid this test process runs as (the owner of its `/proc/self`).
fn running_user_id() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .expect("stat /proc/self")
}

fn create_template() -> PathBuf {
    let root = template_root();
    let initdb = if bindir().as_os_str().is_empty() {
        PathBuf::from("initdb")
    } else {
        bindir().join("initdb")
    };
    // Key: binaries (path and mtime), user, options version.
    let mtime = std::fs::metadata(&initdb)
        .map(|m| m.mtime())
        .unwrap_or_default();
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (initdb.clone(), mtime, running_as_root(), TEMPLATE_VERSION).hash(&mut h);
        h.finish()
    };
    let final_dir = root.join(format!("pg-template-{key:016x}"));
    let final_data = final_dir.join("data");
    if final_data.join("PG_VERSION").exists() {
        return final_data;
    }
    // Build next to the final place, then publish with an atomic rename;
    // a concurrent process that loses the race throws its copy away.
    let nonce: u32 = rand::random();
    let staging = root.join(format!(
        "pg-template-{key:016x}.tmp-{}-{nonce:08x}",
        std::process::id()
    ));
    std::fs::create_dir(&staging).expect("create template staging dir");
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
        .expect("chmod template staging dir");
    chown_to_pg_user(&staging);
    let mut cmd = pg_command("initdb");
    cmd.current_dir(&staging)
        .arg("-D")
        .arg(staging.join("data"))
        .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
        .args(["--no-sync", "--no-instructions"]);
    let started = Instant::now();
    let out = run_sync(cmd);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        panic!("initdb failed: {}", describe(&out));
    }
    if std::env::var_os("PGLOCK_TEST_TIMING").is_some() {
        eprintln!("initdb template took {:?}", started.elapsed());
    }
    if std::fs::rename(&staging, &final_dir).is_err() {
        // Someone else published first (or the rename failed for another
        // reason, which the check below reports).
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        final_data.join("PG_VERSION").exists(),
        "template {} missing after initdb",
        final_data.display()
    );
    final_data
}

/// Self-signed certificate and key in `dir`, readable by the server only.
fn make_self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-nodes", "-days", "2"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null());
    let out = run_sync(cmd);
    assert!(out.status.success(), "openssl req: {}", describe(&out));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).expect("chmod cert");
    chown_to_pg_user(&key);
    chown_to_pg_user(&cert);
    (cert, key)
}

/// A port that is free now, chosen below the ephemeral range so that client
/// sockets cannot grab it while the server is down during a restart.
fn pick_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 16000 {
        (15000, ephemeral_low)
    } else {
        (ephemeral_low.saturating_sub(5000).max(1024), ephemeral_low)
    };
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(low..high);
        if port == 5432 {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

fn port_in_use_error(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not create any TCP/IP sockets")
}

/// Whether `pid` is a live (not zombie) process. An exited postmaster can
/// linger briefly as a zombie until init reaps it, so `/proc/PID` existing
/// is not enough.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: "pid (comm) state ..."; comm may contain spaces/parens.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn append_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for line in lines {
        writeln!(f, "{line}").expect("append config line");
    }
}

fn run_sync(mut cmd: Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()))
}

async fn run_async(cmd: Command) -> std::process::Output {
    let program = cmd.get_program().to_os_string();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let fut = cmd.output();
    match tokio::time::timeout(PG_CTL_TIMEOUT + Duration::from_secs(5), fut).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("spawn {program:?}: {e}"),
        Err(_) => panic!("{program:?} did not finish in time"),
    }
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Copies the server at `127.0.0.1:from_port` into `data` as a streaming standby of it
/// (`pg_basebackup -R`), run from `dir`.
fn base_backup(dir: &Path, data: &Path, from_port: u16) {
    let mut backup = pg_command("pg_basebackup");
    backup
        .current_dir(dir)
        .args(["-h", "127.0.0.1", "-p", &from_port.to_string()])
        .args(["-U", SUPERUSER, "-D"])
        .arg(data)
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    let out = run_sync(backup);
    assert!(out.status.success(), "pg_basebackup: {}", describe(&out));
}
