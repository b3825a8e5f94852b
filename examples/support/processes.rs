//! For the examples that run as several OS processes, as the containers of one service would:
//! starting copies of the running program and waiting for them.

use std::process::Stdio;

/// The variable that tells a copy its name (`instance-1`, `instance-2`, ...).
pub const INSTANCE: &str = "PGLOCK_EXAMPLE_INSTANCE";

/// The variable that tells a copy how many copies were started.
pub const INSTANCES: &str = "PGLOCK_EXAMPLE_INSTANCES";

/// Starts `count` copies of this program at once, each with its name and the count in its
/// environment, and waits for them all; an error if one of them failed.
pub async fn run_copies(count: usize) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 1..=count {
        children.push(
            tokio::process::Command::new(&exe)
                .env(INSTANCE, format!("instance-{i}"))
                .env(INSTANCES, count.to_string())
                .stdout(Stdio::inherit())
                .spawn()?,
        );
    }
    for mut child in children {
        let status = child.wait().await?;
        if !status.success() {
            return Err(format!("an instance failed: {status}").into());
        }
    }
    Ok(())
}
