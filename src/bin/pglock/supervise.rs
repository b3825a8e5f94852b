//! Running the command while the lock is held: forwarding signals, and stopping it when the
//! lock is lost.

use std::future::Future;

use crate::child::{self, Running, Signals};
use crate::format::{human_duration, signal_name};
use crate::output::Output;

/// How the supervised command ended.
pub enum Outcome {
    /// On its own, or after a forwarded signal, with this exit code. `stopping` when pglock
    /// was asked to stop (SIGINT, SIGTERM or SIGQUIT forwarded) meanwhile.
    Exited { code: i32, stopping: bool },
    /// The lock was lost (for `reason`) and pglock stopped the command (as `stopped` says).
    Lost { reason: String, stopped: String },
    /// Waiting for it failed.
    WaitFailed(std::io::Error),
}

/// Runs until the command exits, forwarding signals, and stops it when `lost` resolves (with
/// the reason the lock was lost).
pub async fn supervise(
    running: &mut Running,
    lost: impl Future<Output = String>,
    signals: &mut Signals,
    out: &Output,
) -> Outcome {
    let mut lost = std::pin::pin!(lost);
    let mut stopping = false;
    loop {
        tokio::select! {
            status = running.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited { code: child::exit_code(status), stopping },
                    Err(error) => Outcome::WaitFailed(error),
                };
            }
            signal = signals.recv() => {
                stopping |= matches!(signal, libc::SIGINT | libc::SIGTERM | libc::SIGQUIT);
                if running.forward(signal) {
                    out.verbose(format_args!(
                        "forwarded {} to the command",
                        signal_name(signal)
                    ));
                }
            }
            reason = &mut lost => {
                out.error(format_args!(
                    "the lock is lost: stopping the command ({} now, SIGKILL after {})",
                    signal_name(running.stop_signal()),
                    human_duration(running.kill_after())
                ));
                let stopped = match running.stop().await {
                    Ok(status) => describe_status(status),
                    Err(error) => format!("could not wait for it: {error}"),
                };
                return Outcome::Lost { reason, stopped };
            }
        }
    }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code}"),
        (None, Some(signal)) => format!("it died of {}", signal_name(signal)),
        _ => status.to_string(),
    }
}
