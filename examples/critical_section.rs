//! Several instances of one program take turns in a critical section guarded by pglock.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example critical_section -- 4
//! ```
//!
//! The program starts the given number of copies of itself (default 4) as separate OS
//! processes, as containers of one service would be. Each copy enters the critical section three
//! times; the output shows that only one is ever inside.

#[path = "support/processes.rs"]
mod processes;

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, Pool};
use pglock::{AdvisoryLock, AdvisoryLockGuard};
use tokio_postgres::NoTls;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    match std::env::var(processes::INSTANCE) {
        Ok(name) => instance(&url, &name).await,
        Err(_) => {
            let count: usize = std::env::args().nth(1).map_or(Ok(4), |n| n.parse())?;
            launch(count).await
        }
    }
}

/// Starts `count` copies of this program at once and waits for them.
async fn launch(count: usize) -> Result<(), Box<dyn std::error::Error>> {
    println!("starting {count} instances; each enters the critical section 3 times");
    processes::run_copies(count).await?;
    println!("all {count} instances done; nobody was ever inside together");
    Ok(())
}

/// One instance: a pool of its own, three turns in the critical section.
async fn instance(url: &str, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let config: tokio_postgres::Config = url.parse()?;
    let pool = Pool::builder(Manager::new(config, NoTls))
        .max_size(2)
        .build()?;
    let lock = AdvisoryLock::new(&pool, "examples/critical-section");
    for turn in 1..=3 {
        let asked = Instant::now();
        let guard = lock.lock().await?;
        println!(
            "{name}: inside (turn {turn}, waited {:>4} ms, backend pid {})",
            asked.elapsed().as_millis(),
            AdvisoryLockGuard::backend_pid(&guard)
        );
        // The protected work; it may use the guard's own connection.
        guard.execute("SELECT pg_sleep(0.1)", &[]).await?;
        println!("{name}: leaving");
        AdvisoryLockGuard::unlock(guard).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
