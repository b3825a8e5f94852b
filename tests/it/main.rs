//! Integration tests against a real PostgreSQL (`DATABASE_URL`, default the local `test`
//! database). One binary, one shared harness (`harness`), and fault-injection tools
//! (`support`: throwaway clusters, a TCP proxy that can cut the network).

mod harness;
mod support;

mod basics;
mod bouncer;
mod cancel;
mod cohort;
mod combined;
mod errors;
mod exclusion;
#[cfg(feature = "cli")]
mod failover;
mod handoff;
mod leader;
mod lock_set;
mod loss;
mod loss_probe;
// The library's metrics (feature `metrics`, which `cli` turns on).
#[cfg(feature = "metrics")]
mod lib_metrics;
mod modes;
mod partition;
mod pgbouncer;
mod release;
mod semaphore;
mod send_sync;
mod shared_session;
mod soak;
mod support_selftest;
mod timeouts;
mod tls;
mod tracing_events;
mod verification;

// The `pglock` command and the introspection API.
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod cli_fleet;
#[cfg(feature = "cli")]
mod cli_http;
#[cfg(feature = "cli")]
mod cli_semaphore;
#[cfg(feature = "cli")]
mod cli_standby;
#[cfg(feature = "cli")]
mod cli_urls;
// The `pglock` command in front of real Alembic and Celery (a Python venv; see the module).
#[cfg(feature = "cli")]
mod e2e_python;
mod introspect;
