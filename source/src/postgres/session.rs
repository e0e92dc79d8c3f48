//! Connections: parsing the connection string, the pool, the settings every
//! session gets, and a pooled session that never goes back to the pool inside
//! an open transaction.

use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType,
};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{SourceError, describe};

/// Settings applied to every session this crate opens, pooled or dedicated.
///
/// `standard_conforming_strings` makes `quote_literal` sound (backslashes are
/// plain characters); `search_path` is pinned to `pg_catalog` like `pg_dump`
/// does, so no user schema can shadow a function or operator we call; the
/// rest make `to_jsonb` output independent of role or database defaults.
pub(crate) const SESSION_SETUP: &str = "SET standard_conforming_strings = on; \
     SET search_path = pg_catalog; \
     SET TimeZone = 'UTC'; \
     SET IntervalStyle = 'postgres'; \
     SET bytea_output = 'hex'; \
     SET extra_float_digits = 1";

/// How long establishing one connection may take when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a recycled connection may take to prove it is alive.
const RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a `postgres://`, `postgresql://` or `key=value` connection string.
///
/// The error never echoes the string: it may hold a password.
pub(crate) fn parse_config(url: &str) -> Result<Config, SourceError> {
    let mut config: Config =
        url.parse()
            .map_err(|error: tokio_postgres::Error| SourceError::Config {
                reason: format!("cannot parse the connection string: {}", describe(&error)),
            })?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(SourceError::Config {
            reason: "the connection string names no host".into(),
        });
    }
    if config.get_user().is_none() {
        return Err(SourceError::Config {
            reason: "the connection string names no user".into(),
        });
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("koan-source");
    }
    Ok(config)
}

/// `host:port[,host:port]/database as user`: names the server, never the password.
pub(crate) fn describe_target(config: &Config) -> String {
    let ports = config.get_ports();
    let port_of = |index: usize| {
        ports
            .get(index)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432)
    };
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port_of(index)),
            Host::Unix(path) => format!("{}:{}", path.display(), port_of(index)),
        })
        .collect();
    if hosts.is_empty() {
        hosts = config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(index, addr)| format!("{addr}:{}", port_of(index)))
            .collect();
    }
    let user = config.get_user().unwrap_or("?");
    let database = config.get_dbname().unwrap_or(user);
    format!("{}/{database} as {user}", hosts.join(","))
}

/// Builds the pool; no connection is made until the first checkout.
pub(crate) fn build_pool(config: Config, max_connections: usize) -> Result<Pool, SourceError> {
    if max_connections == 0 {
        return Err(SourceError::Config {
            reason: "max_connections must be at least 1".into(),
        });
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let setup = Hook::async_fn(|client, _metrics| {
        Box::pin(async move {
            client
                .batch_execute(SESSION_SETUP)
                .await
                .map_err(HookError::Backend)
        })
    });
    Pool::builder(manager)
        .max_size(max_connections)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(5)))
        .recycle_timeout(Some(RECYCLE_TIMEOUT))
        .post_create(setup)
        .build()
        .map_err(|error| SourceError::Config {
            reason: format!("cannot build the connection pool: {error}"),
        })
}

/// Maps a failed connection attempt: a refusal from the server, or no server at all.
pub(crate) fn connect_error(target: &str, error: tokio_postgres::Error) -> SourceError {
    let reason = describe(&error);
    if let Some(db) = error.as_db_error() {
        return SourceError::ConnectRejected {
            target: target.to_string(),
            reason,
            sqlstate: Some(db.code().code().to_string()),
        };
    }
    let kind = error.to_string();
    if kind.starts_with("authentication") || kind.starts_with("error performing TLS") {
        return SourceError::ConnectRejected {
            target: target.to_string(),
            reason,
            sqlstate: None,
        };
    }
    if kind.starts_with("invalid configuration") {
        return SourceError::Config { reason };
    }
    SourceError::Unreachable {
        target: target.to_string(),
        reason,
    }
}

/// Maps a failed pool checkout.
pub(crate) fn pool_error(target: &str, error: PoolError) -> SourceError {
    match error {
        PoolError::Timeout(TimeoutType::Wait) => SourceError::PoolTimeout {
            target: target.to_string(),
        },
        PoolError::Timeout(_) => SourceError::Unreachable {
            target: target.to_string(),
            reason: "timed out connecting".into(),
        },
        PoolError::Backend(error) | PoolError::PostCreateHook(HookError::Backend(error)) => {
            connect_error(target, error)
        }
        PoolError::PostCreateHook(HookError::Message(message)) => SourceError::Config {
            reason: message.into_owned(),
        },
        PoolError::Closed => SourceError::PoolClosed {
            target: target.to_string(),
        },
        PoolError::NoRuntimeSpecified => SourceError::Config {
            reason: "the connection pool has no runtime".into(),
        },
    }
}

/// A pooled connection that is discarded, not returned to the pool, when it
/// is dropped inside a transaction (or in the middle of a `COPY`).
pub(crate) struct Session {
    /// Present from checkout until drop; `Option` only so `Drop` can take it out of the pool.
    object: Option<Object>,
    /// Set before `BEGIN` is sent, cleared once `COMMIT`/`ROLLBACK` succeeded.
    in_transaction: bool,
}

impl Session {
    /// Checks a connection out of the pool.
    pub(crate) async fn checkout(pool: &Pool, target: &str) -> Result<Self, SourceError> {
        let object = pool
            .get()
            .await
            .map_err(|error| pool_error(target, error))?;
        Ok(Self {
            object: Some(object),
            in_transaction: false,
        })
    }

    /// The driver client.
    pub(crate) fn client(&self) -> &Client {
        // `object` is only `None` inside `Drop`.
        self.object
            .as_deref()
            .map(|wrapper| &**wrapper)
            .expect("a session holds its connection until it is dropped")
    }

    /// `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, then
    /// `SET TRANSACTION SNAPSHOT` when a snapshot id is given.
    pub(crate) async fn begin(&mut self, snapshot_id: Option<&str>) -> Result<(), SourceError> {
        self.in_transaction = true;
        self.client()
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|error| SourceError::query("begin a repeatable read transaction", error))?;
        if let Some(snapshot_id) = snapshot_id {
            import_snapshot(self.client(), snapshot_id).await?;
        }
        Ok(())
    }

    /// `BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE`: the transaction restores write in.
    pub(crate) async fn begin_write(&mut self) -> Result<(), SourceError> {
        self.in_transaction = true;
        self.client()
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE")
            .await
            .map_err(|error| SourceError::query("begin a read-write transaction", error))
    }

    /// Commits and returns the connection to the pool.
    pub(crate) async fn commit(mut self) -> Result<(), SourceError> {
        self.client()
            .batch_execute("COMMIT")
            .await
            .map_err(|error| SourceError::query("commit", error))?;
        self.in_transaction = false;
        Ok(())
    }

    /// Rolls back and returns the connection to the pool; discards it if even that fails.
    pub(crate) async fn abort(mut self) {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.in_transaction = false;
        }
    }

    /// Ends a transaction after `error`: discards the connection when it was
    /// lost (or may be mid-statement), else rolls back and returns it to the pool.
    pub(crate) async fn end_failed(self, error: &SourceError) {
        if error.code() == "connection_lost" {
            self.discard();
        } else {
            self.abort().await;
        }
    }

    /// Closes the connection without returning it to the pool.
    pub(crate) fn discard(mut self) {
        self.in_transaction = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.in_transaction
            && let Some(object) = self.object.take()
        {
            // Detach from the pool; dropping the wrapper aborts the connection
            // task, the socket closes and the server rolls back.
            drop(Object::take(object));
            tracing::debug!("discarded a connection left inside a transaction");
        }
    }
}

/// `SET TRANSACTION SNAPSHOT '...'`; a snapshot the server no longer knows is [`SourceError::SnapshotLost`].
pub(crate) async fn import_snapshot(client: &Client, snapshot_id: &str) -> Result<(), SourceError> {
    check_snapshot_id(snapshot_id)?;
    let literal = koan_protocol::names::quote_literal(snapshot_id)?;
    client
        .batch_execute(&format!("SET TRANSACTION SNAPSHOT {literal}"))
        .await
        .map_err(|error| {
            let lost = error.as_db_error().is_some_and(|db| {
                matches!(db.code().code(), "22023" | "55000")
                    || db.message().contains("invalid snapshot identifier")
            });
            if lost {
                SourceError::SnapshotLost {
                    snapshot_id: snapshot_id.to_string(),
                    reason: describe(&error),
                }
            } else {
                SourceError::query(format!("import snapshot {snapshot_id}"), error)
            }
        })
}

/// Snapshot ids are hex digits and dashes (`00000003-0000001B-1`).
fn check_snapshot_id(snapshot_id: &str) -> Result<(), SourceError> {
    let well_formed = !snapshot_id.is_empty()
        && snapshot_id.len() <= 64
        && snapshot_id
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-');
    if well_formed {
        Ok(())
    } else {
        Err(SourceError::SnapshotLost {
            snapshot_id: snapshot_id.escape_default().take(80).collect(),
            reason: "not a snapshot identifier (expected hex digits and dashes)".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_server_but_never_the_password() {
        let config = parse_config("postgresql://alice:s3cret@db.example:6543/app").expect("url");
        let target = describe_target(&config);
        assert_eq!(target, "db.example:6543/app as alice");
        let config = parse_config("host=127.0.0.1 user=postgres password=s3cret").expect("kv");
        assert_eq!(
            describe_target(&config),
            "127.0.0.1:5432/postgres as postgres"
        );
        let error = parse_config("postgresql://alice:s3cret@db:notaport/app").expect_err("port");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert!(parse_config("user=postgres").is_err());
    }

    #[test]
    fn snapshot_ids_are_checked_before_reaching_sql() {
        check_snapshot_id("00000003-0000001B-1").expect("valid");
        for bad in ["", "x'; drop table t; --", "00000003 0000001B"] {
            assert!(check_snapshot_id(bad).is_err(), "{bad:?}");
        }
    }
}
