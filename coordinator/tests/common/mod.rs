//! Test support: a fresh PostgreSQL schema per test, dropped at the end.

#![allow(dead_code)]

use std::sync::Mutex;

pub mod service;

use koan_coordinator::CoordinatorError;
use koan_coordinator::store::{OutboxMessage, OutboxSink, PgStateStore, Policy};

/// The test database (override with `KOAN_TEST_DATABASE_URL`).
pub fn database_url() -> String {
    std::env::var("KOAN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A schema `koan_t_<uuid>` of its own, dropped with CASCADE when the value is dropped.
pub struct TestSchema {
    /// Schema name.
    pub name: String,
    url: String,
}

impl TestSchema {
    /// Checks PostgreSQL is reachable and names a fresh schema.
    pub async fn new() -> Self {
        let url = database_url();
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                drop(client);
                drop(connection);
            }
            Err(error) => panic!(
                "PostgreSQL is not reachable at {url} ({error}); these tests need a real \
                 PostgreSQL with trust auth for user postgres. Start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
            ),
        }
        Self {
            name: format!("koan_t_{}", uuid::Uuid::new_v4().simple()),
            url,
        }
    }

    /// A store on this schema (migrating it if needed).
    pub async fn store(&self, policy: Policy) -> PgStateStore {
        PgStateStore::connect(&self.url, &self.name, 4, policy)
            .await
            .unwrap_or_else(|error| panic!("connecting the PostgreSQL state store: {error}"))
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let statement = format!(
            "SET lock_timeout = '20s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.name
        );
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("PostgreSQL reachable to drop the test schema");
                let task = tokio::spawn(connection);
                client
                    .batch_execute(&statement)
                    .await
                    .expect("dropping the test schema");
                drop(client);
                let _ = task.await;
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop test schema {}", self.name);
        }
    }
}

/// An outbox sink that keeps what it is given, optionally failing after `fail_after` messages.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Messages published, in order.
    pub messages: Mutex<Vec<OutboxMessage>>,
    /// Refuse every message after this many.
    pub fail_after: Option<usize>,
}

impl Recorder {
    /// Messages published so far.
    pub fn taken(&self) -> Vec<OutboxMessage> {
        self.messages.lock().expect("recorder lock").clone()
    }
}

impl OutboxSink for Recorder {
    async fn publish(&self, message: &OutboxMessage) -> Result<(), CoordinatorError> {
        let mut messages = self.messages.lock().expect("recorder lock");
        if self.fail_after.is_some_and(|limit| messages.len() >= limit) {
            return Err(CoordinatorError::InvalidReport("recorder refuses".into()));
        }
        messages.push(message.clone());
        Ok(())
    }
}
