//! Fresh databases on the shared server: one per use, so that the Python clients start from an
//! empty schema (the race they run into is on creating it) and nothing they create outlives the
//! test.
//!
//! # Cleanup
//!
//! The `DROP DATABASE` is armed before the `CREATE`: a small `sh` wrapper, in a process group of
//! its own, reads a pipe from the test process and drops the database when the pipe closes.
//! [`FreshDatabase::drop_now`] and `Drop` close it; so does the kernel when the test process
//! dies in any way (a panic, a nextest timeout that kills the test's process group, SIGKILL).
//! `WITH (FORCE)` ends any session still connected.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Command, Stdio};

use rand::Rng;
use tokio_postgres::config::Host;

use crate::harness::{connect, database_url};

/// A database created for one test; see the module docs.
pub struct FreshDatabase {
    name: String,
    server: tokio_postgres::Config,
    dropper: Child,
    /// Closing this pipe drops the database.
    lifeline: Option<ChildStdin>,
}

impl FreshDatabase {
    /// Creates a database named after `purpose` plus a random suffix, from `template0` (which
    /// nobody connects to, so that a concurrent `CREATE DATABASE` elsewhere cannot fail this
    /// one).
    pub async fn create(purpose: &str) -> FreshDatabase {
        let name = format!(
            "pglock_e2e_{purpose}_{:08x}",
            rand::thread_rng().gen::<u32>()
        );
        let mut dropper = Command::new("sh")
            .arg("-c")
            .arg(
                "cat >/dev/null; \
                 exec psql -X -q -v ON_ERROR_STOP=1 \"$1\" -c \"DROP DATABASE IF EXISTS \\\"$2\\\" WITH (FORCE)\"",
            )
            .arg("drop-database")
            .arg(database_url())
            .arg(&name)
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn the database's dropper");
        let lifeline = dropper.stdin.take();
        let database = FreshDatabase {
            server: database_url().parse().expect("DATABASE_URL"),
            name,
            dropper,
            lifeline,
        };
        connect(&database_url())
            .await
            .batch_execute(&format!(
                "CREATE DATABASE \"{}\" TEMPLATE template0",
                database.name
            ))
            .await
            .expect("CREATE DATABASE");
        database
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's URL in the form `scheme://user[:password]@host:port/name`, with the
    /// server and credentials of `DATABASE_URL`: `postgresql`, `postgresql+psycopg2`,
    /// `sqla+postgresql`...
    pub fn url(&self, scheme: &str) -> String {
        let server = &self.server;
        let mut userinfo = encode(server.get_user().unwrap_or("postgres"));
        if let Some(password) = server.get_password() {
            userinfo.push(':');
            userinfo.push_str(&encode(&String::from_utf8_lossy(password)));
        }
        let port = server.get_ports().first().copied().unwrap_or(5432);
        match server.get_hosts().first() {
            Some(Host::Unix(dir)) => format!(
                "{scheme}://{userinfo}@/{}?host={}&port={port}",
                self.name,
                encode(&dir.to_string_lossy())
            ),
            Some(Host::Tcp(host)) => format!("{scheme}://{userinfo}@{host}:{port}/{}", self.name),
            None => format!("{scheme}://{userinfo}@127.0.0.1:{port}/{}", self.name),
        }
    }

    /// Drops the database now and checks that it is gone.
    pub async fn drop_now(mut self) {
        self.drop_database();
        let left: i64 = connect(&database_url())
            .await
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "database {} was not dropped", self.name);
    }

    fn drop_database(&mut self) {
        if let Some(mut pipe) = self.lifeline.take() {
            let _ = pipe.flush();
            drop(pipe);
            let _ = self.dropper.wait();
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        self.drop_database();
    }
}

/// Percent-encodes what a URL's user, password or query value cannot hold as it is.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
