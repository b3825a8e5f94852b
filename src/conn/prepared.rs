//! The one memory of what pglock prepared on a connection: a [`Session`](crate::Session) keeps
//! its own, and each pooled connection has one in [`Remembered`](crate::conn::pooled), which
//! outlives a checkout.

use std::sync::Mutex;

use tokio_postgres::{Client, Statement};

/// pglock's statements prepared on one connection, by the address of their text.
///
/// pglock's SQL texts are `&'static` strings from `sql::statement`, so an address names a
/// text: a lookup compares pointers, never hashes or compares SQL. The texts are finitely many
/// (a few per kind of acquisition a program uses), so nothing is ever evicted. A lookup goes
/// newest first: once a connection is verified, the plain statements it uses from then on come
/// after the checking ones of its first acquisition.
#[derive(Debug, Default)]
pub(crate) struct PreparedStatements(Mutex<Vec<(&'static str, Statement)>>);

impl PreparedStatements {
    /// The statement prepared for `sql`, if there is one: no future, only a short mutex.
    #[inline(always)]
    pub(crate) fn cached(&self, sql: &'static str) -> Option<Statement> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(text, _)| std::ptr::eq(*text, sql))
            .map(|(_, statement)| statement.clone())
    }

    /// The statement for `sql`, prepared on `client` (the connection this memory is of) the
    /// first time.
    pub(crate) async fn prepare(
        &self,
        client: &Client,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cached(sql) {
            return Ok(statement);
        }
        let statement = client.prepare(sql).await?;
        let mut statements = self.0.lock().unwrap();
        // Two tasks may have prepared the same text at once: keep one.
        if !statements.iter().any(|(text, _)| std::ptr::eq(*text, sql)) {
            statements.push((sql, statement.clone()));
        }
        Ok(statement)
    }

    /// Forgets every statement, after the server reported one gone (`DEALLOCATE`): each is
    /// prepared again on next use.
    pub(crate) fn forget_all(&self) {
        self.0.lock().unwrap().clear();
    }
}
