//! The shared test harness: connections to the test database, unique keys, and the leak check
//! every test ends with.
#![allow(dead_code)]

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pglock::{AdvisoryKey, Session};
use rand::Rng;
use tokio_postgres::{Client, NoTls};

/// The database the tests use: `DATABASE_URL`, or the local server's `test` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// One test's view of the database. Every connection it makes carries an application name
/// unique to the test, so the leak check sees exactly this test's sessions, although tests run
/// in parallel against one database.
pub struct TestDb {
    pub app: String,
    admin: Client,
    base_url: String,
}

impl TestDb {
    pub async fn new(test: &str) -> Self {
        Self::on_server(&database_url(), test).await
    }

    /// A harness on another server, e.g. a throwaway cluster.
    pub async fn on_server(base_url: &str, test: &str) -> Self {
        let app = format!("pglock-test-{test}-{:08x}", rand::thread_rng().gen::<u32>());
        let admin = connect(base_url).await;
        TestDb {
            app,
            admin,
            base_url: base_url.to_owned(),
        }
    }

    /// A harness for sessions that an earlier `TestDb` created (same application name).
    pub async fn reopen(app: String) -> Self {
        let admin = connect(&database_url()).await;
        TestDb {
            app,
            admin,
            base_url: database_url(),
        }
    }

    /// The URL of the test database with this test's application name.
    pub fn url(&self) -> String {
        let base = &self.base_url;
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}application_name={}", self.app)
    }

    /// A pool of `size` connections, all of them open (so that the pool's size and its
    /// connection tasks stay as they are while a test counts them).
    pub async fn open_pool(&self, size: usize) -> Pool {
        let pool = self.pool(size);
        let mut open = Vec::with_capacity(size);
        for _ in 0..size {
            open.push(pool.get().await.unwrap());
        }
        pool
    }

    /// A pool of at most `size` connections, with deadpool's default (fast) recycling: it does
    /// not clean up advisory locks, so leaks show.
    pub fn pool(&self, size: usize) -> Pool {
        let config: tokio_postgres::Config = self.url().parse().unwrap();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .unwrap()
    }

    pub async fn session(&self) -> Arc<Session> {
        Arc::new(
            Session::connect(&self.url())
                .await
                .expect("connect a session"),
        )
    }

    /// A session declared [`dedicated`](Session::dedicated) to one task: its waits queue on
    /// the server and it may hold transaction-scoped locks.
    pub async fn dedicated_session(&self) -> Arc<Session> {
        Arc::new(
            Session::connect(&self.url())
                .await
                .expect("connect a session")
                .dedicated(),
        )
    }

    /// A plain client of this test (counted by the leak check).
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// The harness's own client, not counted by the leak check.
    pub fn admin(&self) -> &Client {
        &self.admin
    }

    /// A key no other test uses.
    pub fn key(&self) -> AdvisoryKey {
        AdvisoryKey::Single(rand::thread_rng().gen())
    }

    /// The statement the backend `pid` is running, or ran last when idle.
    pub async fn statement_of(&self, pid: i32) -> String {
        self.admin
            .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0)
    }

    /// The advisory locks of this test's sessions: `(pid, key, mode, granted)`.
    pub async fn locks(&self) -> Vec<(i32, AdvisoryKey, String, bool)> {
        self.admin
            .query(
                "SELECT l.pid, l.classid::int8, l.objid::int8, l.objsubid::int2, l.mode, l.granted
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND a.application_name = $1 ORDER BY l.pid",
                &[&self.app],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let key = AdvisoryKey::from_pg_locks_ids(
                    row.get::<_, i64>(1) as u32,
                    row.get::<_, i64>(2) as u32,
                    row.get(3),
                )
                .unwrap();
                (row.get(0), key, row.get(4), row.get(5))
            })
            .collect()
    }

    /// Backend pids holding `key` (granted), from any session of any test.
    pub async fn holders(&self, key: AdvisoryKey) -> Vec<i32> {
        self.lock_rows(key, true).await
    }

    /// Backend pids waiting for `key`.
    pub async fn waiters(&self, key: AdvisoryKey) -> Vec<i32> {
        self.lock_rows(key, false).await
    }

    async fn lock_rows(&self, key: AdvisoryKey, granted: bool) -> Vec<i32> {
        let (classid, objid, objsubid) = key.pg_locks_ids();
        self.admin
            .query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int8::oid
                 AND objid = $2::int8::oid AND objsubid = $3 AND granted = $4 ORDER BY pid",
                &[&i64::from(classid), &i64::from(objid), &objsubid, &granted],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Waits (up to `within`) until `key` has exactly `n` waiters.
    pub async fn wait_for_waiters(&self, key: AdvisoryKey, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting = self.waiters(key).await.len();
            if waiting == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} waiters on {key}, saw {waiting}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the backend `pid` and waits (up to 5 s) until it has exited, and so freed its locks:
    /// `pg_terminate_backend` only sends the signal.
    pub async fn terminate_and_wait(&self, pid: i32) {
        self.terminate(pid).await;
        self.wait_backend_gone(pid).await;
    }

    /// Waits (up to 5 s) until the backend `pid` has exited.
    pub async fn wait_backend_gone(&self, pid: i32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let alive: i64 = self
                .admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if alive == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend {pid} still alive after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the backend `pid` as an administrator would.
    pub async fn terminate(&self, pid: i32) {
        let done: bool = self
            .admin
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(done, "pg_terminate_backend({pid})");
    }

    /// The leak check: no session of this test holds or awaits any advisory lock. Release on
    /// drop finishes in the background within about a round trip, so this waits up to 5 s.
    pub async fn assert_no_locks(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let locks = self.locks().await;
            if locks.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "advisory locks leaked by {}: {locks:?}",
                self.app
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many sessions of this test are connected now.
    pub async fn sessions(&self) -> i64 {
        self.admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.app],
            )
            .await
            .unwrap()
            .get(0)
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Waits (up to 5 s) until `session` no longer holds `key`: the background cleanup of an
/// abandoned acquisition, or the unlock a dropped guard left to send, has finished.
pub async fn session_cleaned_up(session: &Session, key: AdvisoryKey) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.holds(key) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the session's abandoned attempt was cleaned up");
}

/// Polls `future` at most `polls` times, then drops it if it has not finished: the
/// cancellation point of a test is "after exactly N polls".
pub async fn drop_after_polls<F: Future>(future: F, polls: usize) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut seen = 0;
    poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => {
            seen += 1;
            if seen >= polls {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    })
    .await
}

/// Waits (at most 5 s) until the runtime of `tasks` has `alive` tasks alive.
pub async fn wait_for_alive_tasks(tasks: &tokio::runtime::RuntimeMetrics, alive: usize) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.num_alive_tasks() != alive {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{} tasks alive, expected {alive}",
        tasks.num_alive_tasks()
    );
}

/// How many of pglock's advisory lock statements are prepared on `client`'s backend, as
/// `(checking, plain)`: the checking forms call `pg_backend_pid()`, the plain ones, for a
/// connection verified as direct, do not (see src/backend.rs).
pub async fn prepared_lock_statements(client: &Client) -> (usize, usize) {
    let texts: Vec<String> = client
        .query_typed(
            "SELECT statement FROM pg_prepared_statements \
             WHERE statement LIKE '%advisory%' AND statement NOT LIKE '%pg_prepared_statements%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let checking = texts
        .iter()
        .filter(|text| text.contains("pg_backend_pid()"))
        .count();
    (checking, texts.len() - checking)
}
