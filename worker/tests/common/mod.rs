//! Per-test PostgreSQL databases and RabbitMQ vhosts, removed when the test ends.

#![allow(clippy::unwrap_used, dead_code)]

pub mod archive;

use std::path::PathBuf;
use std::process::Command;

use uuid::Uuid;

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own, dropped when the test ends (even when it fails).
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub directory: PathBuf,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let (admin, connection) = tokio_postgres::connect(ADMIN_URL, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) is unreachable: {error}; \
                     start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                )
            });
        tokio::spawn(connection);
        let name = format!("koan_worker_{}", Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let directory = std::env::temp_dir().join(&name);
        Self {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
            directory,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::fs::remove_dir_all(&self.directory);
        // A runtime of its own: Drop may run while the test's runtime is unwinding.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (admin, connection) =
                    tokio_postgres::connect(ADMIN_URL, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// A RabbitMQ vhost of its own (so the fixed koan.* names do not collide),
/// deleted when the test ends.
pub struct TestVhost {
    pub name: String,
    pub url: String,
}

impl TestVhost {
    pub fn create() -> Self {
        let name = format!("koan-worker-{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self {
            url: format!("amqp://guest:guest@127.0.0.1:5672/{name}"),
            name,
        }
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl").arg("-q").args(args).output();
    match output {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "RabbitMQ on 127.0.0.1:5672 refused `rabbitmqctl {}`: {}; start it with `rabbitmq-server -detached`",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => panic!(
            "rabbitmqctl could not run ({error}); install RabbitMQ and start it with `rabbitmq-server -detached`"
        ),
    }
}
