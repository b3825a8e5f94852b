//! Compile-time checks: every future and guard can move between threads of a multi-threaded
//! runtime, as `tokio::spawn` requires.

use pglock::{
    AdvisoryKey, AdvisoryLock, AdvisoryLockGuard, ConnectionSource, Error, Semaphore,
    SemaphorePermit, Session,
};

fn is_send<T: Send>(_: &T) {}
fn is_send_sync<T: Send + Sync>() {}

#[allow(dead_code, unused_must_use, clippy::let_underscore_future)]
fn futures_are_send(lock: AdvisoryLock, guard: AdvisoryLockGuard) {
    is_send(&lock.lock());
    is_send(&lock.lock_shared());
    is_send(&lock.try_lock());
    is_send(&lock.try_lock_shared());
    is_send(&lock.try_lock_for(std::time::Duration::from_secs(1)));
    is_send(&lock.try_lock_until(tokio::time::Instant::now()));
    is_send(&Session::connect("postgres://localhost/db"));
    is_send(&AdvisoryLockGuard::unlock(guard));
}

#[allow(dead_code, unused_must_use, clippy::let_underscore_future)]
fn semaphore_futures_are_send(semaphore: Semaphore, permit: SemaphorePermit) {
    is_send(&semaphore.acquire());
    is_send(&semaphore.try_acquire());
    is_send(&semaphore.try_acquire_for(std::time::Duration::from_secs(1)));
    is_send(&semaphore.try_acquire_until(tokio::time::Instant::now()));
    is_send(&permit.release());
}

#[test]
fn types_are_send_and_sync() {
    is_send_sync::<AdvisoryLock>();
    is_send_sync::<AdvisoryLockGuard>();
    is_send_sync::<Session>();
    is_send_sync::<ConnectionSource>();
    is_send_sync::<AdvisoryKey>();
    is_send_sync::<Error>();
    is_send_sync::<Semaphore>();
    is_send_sync::<SemaphorePermit>();
}
