//! Integration tests against a real PostgreSQL (`DATABASE_URL`, default the local `test`
//! database). One binary, one shared harness.

mod harness;

mod basics;
mod cancel;
mod modes;
mod release;
