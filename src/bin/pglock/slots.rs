//! Whether a waiter may keep a connection while it waits: the server's free connection slots.
//!
//! A waiter in the server's lock queue holds one connection for as long as it waits. A fleet
//! that starts together can hold every slot that way, and the holder's own command (the
//! migration that needs a connection of its own) is then refused: the fleet stalls. With
//! `--wait-mode auto`, a waiter queues only while the server keeps [`headroom`] slots free for
//! others, counting every connection open at that moment (the other waiters deciding included),
//! and polls without a connection otherwise.

use std::time::Duration;

use pglock::AdvisoryKey;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::args::WaitMode;
use crate::output::Output;

/// How a waiter waits, once chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// In the server's lock queue, on the connection it has.
    Queue,
    /// Without a connection between attempts.
    Poll,
}

/// The slots that must stay free for a waiter to queue: a tenth of `max_connections`, and at
/// least 5.
pub fn headroom(max_connections: i32) -> i32 {
    (max_connections / 10).max(5)
}

/// The connection slots still free to this role, and `max_connections`. Superusers may use the
/// slots reserved for them; other roles may not. (A macro, so that [`ROOM`] can build on it.)
macro_rules! free_slots_sql {
    () => {
        "SELECT current_setting('max_connections')::int \
         - CASE WHEN r.rolsuper THEN 0 \
           ELSE current_setting('superuser_reserved_connections')::int \
              + coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0) END \
         - (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend'), \
         current_setting('max_connections')::int \
         FROM pg_roles r WHERE r.rolname = current_user"
    };
}
const FREE_SLOTS: &str = free_slots_sql!();

/// The free slots and `max_connections` (as [`FREE_SLOTS`]), and the other sessions with this
/// session's `application_name` (the other instances of the same lock) that connected in the
/// last two seconds: a fleet arriving.
const ROOM: &str = concat!(
    "SELECT f.free, f.max, (SELECT count(*)::int FROM pg_stat_activity a \
     WHERE a.application_name = current_setting('application_name') \
     AND a.pid <> pg_backend_pid() \
     AND a.backend_start > clock_timestamp() - interval '2 seconds') FROM (",
    free_slots_sql!(),
    ") AS f(free, max)"
);

/// The connection slots free to this role now, and `max_connections`; `None` when they cannot
/// be counted (a pooler in between, a restricted catalog).
pub async fn free_slots(client: &Client) -> Option<(i32, i32)> {
    let row = client.query_one(FREE_SLOTS, &[]).await.ok()?;
    Some((row.get(0), row.get(1)))
}

/// Chooses how to wait: as `mode` says, or for `auto` by the free slots seen on `client` (the
/// waiter's own connection, idle). Says on stderr when `auto` chooses to poll.
pub async fn choose(mode: WaitMode, client: &Client, label: &str, out: &Output) -> Waiting {
    let free = match mode {
        WaitMode::Auto => free_slots(client).await,
        WaitMode::Queue | WaitMode::Poll => None,
    };
    decide(mode, free, None, label, out)
}

/// Chooses how to wait: as `mode` says, or for `auto` by `free`, the free slots and
/// `max_connections` (when they could be counted). `now` is how the waiter waits so far, if it
/// has chosen before: a polling waiter goes back to the queue once the server has room again,
/// with two slots to spare so that waiters do not flap between the two. Says on stderr when
/// `auto` changes its choice.
pub fn decide(
    mode: WaitMode,
    free: Option<(i32, i32)>,
    now: Option<Waiting>,
    label: &str,
    out: &Output,
) -> Waiting {
    match mode {
        WaitMode::Queue => Waiting::Queue,
        WaitMode::Poll => Waiting::Poll,
        WaitMode::Auto => {
            let Some((free, max)) = free else {
                out.verbose(format_args!(
                    "cannot count the server's free connection slots: waiting in its queue"
                ));
                return now.unwrap_or(Waiting::Queue);
            };
            let needed = headroom(max) + if now == Some(Waiting::Poll) { 2 } else { 0 };
            let chosen = if free >= needed {
                Waiting::Queue
            } else {
                Waiting::Poll
            };
            match (now, chosen) {
                (Some(before), chosen) if before == chosen => {}
                (_, Waiting::Queue) => out.verbose(format_args!(
                    "{free} of {max} connection slots free: waiting for {label} in the server's queue"
                )),
                (_, Waiting::Poll) => out.info(format_args!(
                    "only {free} of {max} connection slots free (fewer than {needed}): waiting for \
                     {label} without holding a connection, trying again every few seconds"
                )),
            }
            chosen
        }
    }
}

/// The waiters in the server's queue for the advisory lock `key`.
pub async fn queued(client: &Client, key: AdvisoryKey) -> Option<i64> {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    let row = client
        .query_one(QUEUED, &[&i64::from(classid), &i64::from(objid), &objsubid])
        .await
        .ok()?;
    Some(row.get(0))
}

const QUEUED: &str = "SELECT count(*) FROM pg_catalog.pg_locks \
     WHERE locktype = 'advisory' AND NOT granted \
     AND classid = $1::int8::oid AND objid = $2::int8::oid AND objsubid = $3::int2";

/// How long the holder waits at most for room before it starts its command.
const ROOM_WAIT: Duration = Duration::from_secs(10);

/// The slots the holder wants free before it starts its command, which may need connections of
/// its own (a migration tool connects as soon as it starts).
const ROOM_FOR_THE_COMMAND: i32 = 2;

/// How long the slots must have stayed free: the refused instances of a fleet come back in
/// waves (see `connect::Refusals`), a second or more apart once they have been refused twice.
const ROOM_STEADY: Duration = Duration::from_secs(1);

/// [`ROOM`]'s answer; `None` when it cannot be had (a pooler in between, a restricted catalog).
async fn room(client: &Client) -> Option<(i32, i32, i32)> {
    let row = client.query_one(ROOM, &[]).await.ok()?;
    Some((row.get(0), row.get(1), row.get(2)))
}

/// Waits, when the server is short of connection slots or (for a holder that has just started)
/// other instances of the same lock are arriving, until at least [`ROOM_FOR_THE_COMMAND`] slots
/// have stayed free for [`ROOM_STEADY`] (at most [`ROOM_WAIT`]), so that the command the holder
/// starts next can connect. A fleet started at once arrives over a second or more, and the
/// first holder cannot tell from the few instances it sees how many are still on their way:
/// free slots seen at one moment may all be taken by the rest of the fleet's connection
/// attempts by the time its command connects, so it waits whenever it sees one. A holder that got
/// the lock later in its life waits only when slots are short; a holder that finds neither (the
/// usual case) starts its command at once.
///
/// # Cancel safety
///
/// Cancel-safe.
pub async fn room_for_the_command(client: &Client, just_started: bool, out: &Output) {
    match room(client).await {
        Some((free, max, arriving))
            if free < ROOM_FOR_THE_COMMAND || (just_started && arriving > 0) =>
        {
            let message = format_args!(
                "{free} of {max} connection slots free, {arriving} other instances connected \
                 in the last 2s: waiting up to {} for room for the command's own connections",
                crate::format::human_duration(ROOM_WAIT)
            );
            if free < ROOM_FOR_THE_COMMAND {
                out.info(message);
            } else {
                out.verbose(message);
            }
        }
        _ => return,
    }
    let give_up = Instant::now() + ROOM_WAIT;
    let mut free_since = None;
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match free_slots(client).await {
            Some((free, _)) if free >= ROOM_FOR_THE_COMMAND => {
                let since = *free_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ROOM_STEADY {
                    return;
                }
            }
            Some(_) => free_since = None,
            None => return,
        }
    }
}

/// Chooses how to wait when the free slots cannot be counted: as `mode` says, and in the queue
/// for `auto`.
pub fn choose_without_asking(mode: WaitMode) -> Waiting {
    match mode {
        WaitMode::Poll => Waiting::Poll,
        WaitMode::Queue | WaitMode::Auto => Waiting::Queue,
    }
}
