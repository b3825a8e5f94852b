//! PgBouncer instances for the PgBouncer tests.
//!
//! Each [`PgBouncer`] is a private PgBouncer process (Debian's `pgbouncer` package, installed by
//! `.ci/setup-pgbouncer`) listening on 127.0.0.1 on a port of its own, in front of the test
//! database, in the pool mode the test asks for. Its configuration, log and authentication file
//! live in a temporary directory that goes away with it.
//!
//! PgBouncer refuses to run as root: when the tests run as root it is started with `-u postgres`.
//!
//! # Cleanup
//!
//! PgBouncer runs under a small `sh` wrapper whose standard input is a pipe from the test
//! process. `Drop` closes the pipe; so does the kernel when the test process dies in any way
//! (a panic, a nextest timeout, SIGKILL). Either way the wrapper then stops PgBouncer, which
//! closes its server connections (PostgreSQL ends those sessions and frees their locks), and
//! removes the directory.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::harness::database_url;

/// PgBouncer's `pool_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps its server connection until it disconnects.
    Session,
    /// A client has a server connection only for the duration of a transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// The pgbouncer executable, if installed.
fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running PgBouncer; see the module docs.
pub struct PgBouncer {
    port: u16,
    mode: PoolMode,
    dir: PathBuf,
    wrapper: Child,
    /// Closing this pipe stops PgBouncer.
    lifeline: Option<ChildStdin>,
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with at most `pool_size` server connections to the test
    /// database. Returns `None`, after saying why on stderr, only when PgBouncer is not
    /// installed and this is not CI (CI installs it with `.ci/setup-pgbouncer`, so there a
    /// missing PgBouncer fails the test).
    pub async fn start(mode: PoolMode, pool_size: usize) -> Option<PgBouncer> {
        let Some(binary) = binary() else {
            if std::env::var_os("CI").is_some() {
                panic!("pgbouncer is not installed: .ci/setup-pgbouncer should have installed it");
            }
            eprintln!(
                "SKIPPED: pgbouncer is not installed (run .ci/setup-pgbouncer as root to install it)"
            );
            return None;
        };
        let mut last_log = String::new();
        // A port picked by binding port 0 can be taken by someone else before PgBouncer binds
        // it: try a few times.
        for _ in 0..5 {
            let bouncer = Self::spawn(&binary, mode, pool_size);
            match bouncer.wait_until_listening().await {
                Ok(()) => return Some(bouncer),
                Err(log) => last_log = log,
            }
        }
        panic!("pgbouncer did not start; its last log:\n{last_log}");
    }

    fn spawn(binary: &Path, mode: PoolMode, pool_size: usize) -> PgBouncer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let dir = std::env::temp_dir().join(format!(
            "pglock-pgbouncer-{}-{:08x}",
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the pgbouncer directory");
        // PgBouncer runs as `postgres` when we are root: let it write its log here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();

        let server: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
        let host = match server.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let dbname = server.get_dbname().unwrap_or("test").to_owned();
        let user = server.get_user().unwrap_or("postgres").to_owned();
        let password = server
            .get_password()
            .map(|p| format!(" password={}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        // auth_type = any: PgBouncer accepts any client user and logs in to the server as the
        // user of the [databases] entry.
        let ini = format!(
            "[databases]\n\
             {dbname} = host={host} port={server_port} dbname={dbname} user={user}{password}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 200\n\
             logfile = {log}\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            mode = mode.as_str(),
            log = dir.join("pgbouncer.log").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        std::fs::set_permissions(
            dir.join("pgbouncer.ini"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();

        let mut command = format!("\"{}\" ", binary.display());
        if running_as_root() {
            command.push_str("-u postgres ");
        }
        command.push_str("\"$1/pgbouncer.ini\"");
        // The wrapper: start PgBouncer, wait for our end of the pipe to close, stop it, clean up.
        let script = format!(
            "{command} >/dev/null 2>\"$1/stderr.log\" & pid=$!\n\
             cat >/dev/null\n\
             kill $pid 2>/dev/null\n\
             wait $pid 2>/dev/null\n\
             rm -rf \"$1\"\n"
        );
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("pgbouncer-wrapper")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for pgbouncer");
        let lifeline = wrapper.stdin.take();
        PgBouncer {
            port,
            mode,
            dir,
            wrapper,
            lifeline,
        }
    }

    /// Waits until PgBouncer logs that it listens on our port; on failure returns its log.
    async fn wait_until_listening(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let expected = format!("listening on 127.0.0.1:{}", self.port);
        loop {
            let log = self.log();
            if log.contains(&expected) {
                return Ok(());
            }
            if log.contains("FATAL") || log.contains("ERROR") || Instant::now() > deadline {
                return Err(log);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        let read = |name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        read("pgbouncer.log") + &read("stderr.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// The test database's URL through this PgBouncer, with `application_name` set.
    pub fn url(&self, application_name: &str) -> String {
        let server: tokio_postgres::Config = database_url().parse().expect("DATABASE_URL");
        let dbname = server.get_dbname().unwrap_or("test");
        let user = server.get_user().unwrap_or("postgres");
        format!(
            "postgres://{user}@127.0.0.1:{}/{dbname}?application_name={application_name}",
            self.port
        )
    }

    /// Stops PgBouncer and waits until it is gone (its server connections are closed then).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut pipe) = self.lifeline.take() {
            let _ = pipe.flush();
            drop(pipe);
            let _ = self.wrapper.wait();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
