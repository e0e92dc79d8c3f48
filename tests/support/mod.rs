//! Test support: a [`Sandbox`] per test with its own RabbitMQ vhost, its own
//! PostgreSQL database and archive directory, running the real `koan-backup`
//! binary as separate coordinator and worker processes. Everything is removed
//! when the sandbox drops (logs are kept when the test failed).

#![allow(dead_code)]

pub mod archive;
pub mod data;
pub mod phoenix;
pub mod process;

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use koan_protocol::events::OperationEvent;
use koan_protocol::progress::ProgressReport;
use koan_protocol::topology::{EVENTS_EXCHANGE, operation_follow_key};
use koan_transport::{Broker, Subscription};
use uuid::Uuid;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_koan-backup");

const PG_HINT: &str = "PostgreSQL is not reachable at 127.0.0.1:5432; start it with \
    `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`";
const RABBIT_HINT: &str =
    "RabbitMQ is not reachable at 127.0.0.1:5672; start it with `rabbitmq-server -detached`";

/// One test's private world.
pub struct Sandbox {
    /// Unique name: vhost, database and directory names derive from it.
    pub name: String,
    /// RabbitMQ URL of the private vhost.
    pub amqp_url: String,
    /// PostgreSQL URL of the private database (source data and coordinator state).
    pub database_url: String,
    /// Archive storage directory.
    pub storage: PathBuf,
    /// Where process logs and plan files go.
    pub work_dir: PathBuf,
    database: String,
    extra_databases: Vec<String>,
    processes: Vec<Process>,
    env_overrides: Vec<(String, String)>,
}

struct Process {
    name: String,
    child: Child,
}

fn require(address: &str, hint: &str) {
    if TcpStream::connect_timeout(&address.parse().expect("address"), Duration::from_secs(3))
        .is_err()
    {
        panic!("{hint}");
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("running {program}: {error}"))
}

fn psql(database: &str, sql: &str) -> Output {
    run(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAtc",
            sql,
        ],
    )
}

impl Sandbox {
    /// Creates the vhost, database and directories. Panics naming the service
    /// that is unreachable and how to start it.
    pub fn new() -> Self {
        require("127.0.0.1:5432", PG_HINT);
        require("127.0.0.1:5672", RABBIT_HINT);
        let name = format!("kb_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let vhost = name.clone();
        for args in [
            vec!["add_vhost", vhost.as_str()],
            vec![
                "set_permissions",
                "-p",
                vhost.as_str(),
                "guest",
                ".*",
                ".*",
                ".*",
            ],
        ] {
            let output = run("rabbitmqctl", &args);
            assert!(
                output.status.success(),
                "rabbitmqctl {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let output = psql("postgres", &format!("CREATE DATABASE {name}"));
        assert!(
            output.status.success(),
            "{PG_HINT}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let work_dir = std::env::temp_dir().join(&name);
        let storage = work_dir.join("archives");
        std::fs::create_dir_all(&storage).expect("creating the sandbox directory");
        Self {
            amqp_url: format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
            database_url: format!("postgresql://postgres@127.0.0.1:5432/{name}"),
            database: name.clone(),
            extra_databases: Vec::new(),
            name,
            storage,
            work_dir,
            processes: Vec::new(),
            env_overrides: Vec::new(),
        }
    }

    /// Environment every process of this sandbox gets (with [`Sandbox::set_env`]'s).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("KOAN_AMQP_URL", self.amqp_url.clone()),
            ("KOAN_DATABASE_URL", self.database_url.clone()),
            ("KOAN_SOURCE_URL", self.database_url.clone()),
            ("KOAN_STORAGE_URL", self.storage.display().to_string()),
            ("RUST_LOG", "info,lapin=warn".to_string()),
            // No metrics endpoint unless a test asks for one: coordinators of
            // tests running side by side would all want port 9464.
            ("KOAN_METRICS_ADDR", "off".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        for (name, value) in &self.env_overrides {
            env.retain(|(existing, _)| existing != name);
            env.push((name.clone(), value.clone()));
        }
        env
    }

    /// Sets (or replaces) a variable of every process started from now on.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env_overrides.retain(|(existing, _)| existing != name);
        self.env_overrides
            .push((name.to_string(), value.to_string()));
    }

    /// Creates another database (dropped with the sandbox) and returns its URL.
    pub fn create_database(&mut self, suffix: &str) -> String {
        let database = format!("{}_{suffix}", self.name);
        let output = psql("postgres", &format!("CREATE DATABASE {database}"));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.extra_databases.push(database.clone());
        format!("postgresql://postgres@127.0.0.1:5432/{database}")
    }

    /// A PostgreSQL client on another database of this server.
    pub async fn pg_at(&self, url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|error| panic!("{PG_HINT}: {error}"));
        tokio::spawn(connection);
        client
    }

    /// Starts `count` workers of `pool` whose entity store is `source_url`.
    pub fn start_pool_workers(&mut self, pool: &str, source_url: &str, count: usize) {
        for index in 0..count {
            let name = format!("{pool}-worker-{index}");
            self.spawn(
                &name,
                &["worker", "--pool", pool, "--source-url", source_url],
            );
        }
    }

    fn spawn(&mut self, name: &str, args: &[&str]) {
        let mut args: Vec<&str> = args.to_vec();
        if args.first() == Some(&"worker") && !args.contains(&"--worker-id") {
            // Worker ids are the process names, so state and logs map to processes.
            args.extend_from_slice(&["--worker-id", name]);
        }
        let log = File::create(self.work_dir.join(format!("{name}.log"))).expect("log file");
        let mut command = Command::new(BIN);
        command
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {name}: {error}"));
        self.processes.push(Process {
            name: name.to_string(),
            child,
        });
    }

    /// Starts a coordinator process named `name`, with extra arguments.
    pub fn start_coordinator(&mut self, name: &str, extra: &[&str]) {
        let mut args = vec!["coordinator"];
        args.extend_from_slice(extra);
        self.spawn(name, &args);
    }

    /// Starts `count` worker processes named `worker-<i>`.
    pub fn start_workers(&mut self, count: usize, extra: &[&str]) {
        self.start_named_workers("worker", count, extra);
    }

    /// Runs the CLI with this sandbox's environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .expect("running the cli")
    }

    /// Writes a file in the sandbox's work directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.work_dir.join(name);
        std::fs::write(&path, contents).expect("writing a sandbox file");
        path
    }

    /// A PostgreSQL client on the sandbox database.
    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|error| panic!("{PG_HINT}: {error}"));
        tokio::spawn(connection);
        client
    }

    /// A broker connection on the sandbox vhost.
    pub async fn broker(&self) -> Broker {
        Broker::connect(&self.amqp_url, "koan-backup test")
            .await
            .unwrap_or_else(|error| panic!("{RABBIT_HINT}: {error}"))
    }

    /// Every log line written so far by the sandbox's processes.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for process in &self.processes {
            let text = std::fs::read_to_string(self.work_dir.join(format!("{}.log", process.name)))
                .unwrap_or_default();
            all.push_str(&format!("===== {} =====\n{text}\n", process.name));
        }
        all
    }

    /// Whether every started process is still running.
    pub fn assert_alive(&mut self) {
        for process in &mut self.processes {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("{} exited with {status}", process.name);
            }
        }
    }

    /// Path of an archive object.
    pub fn archive_path(&self, key: &str) -> PathBuf {
        self.storage.join(key)
    }

    /// Every file under the archive directory, relative to it.
    pub fn archive_files(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else if let Ok(relative) = path.strip_prefix(root) {
                    out.push(relative.display().to_string());
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.storage, &self.storage, &mut files);
        files.sort();
        files
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if let Ok(None) = process.child.try_wait() {
                let _ = Command::new("kill")
                    .arg(process.child.id().to_string())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for process in &mut self.processes {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = process.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        let _ = run("rabbitmqctl", &["delete_vhost", &self.name]);
        for database in std::iter::once(&self.database).chain(&self.extra_databases) {
            let _ = psql(
                "postgres",
                &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "sandbox {} failed; logs kept in {}",
                self.name,
                self.work_dir.display()
            );
            eprintln!(
                "{}",
                self.logs()
                    .chars()
                    .rev()
                    .take(20_000)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            );
            let _ = std::fs::remove_dir_all(&self.storage);
        } else {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

impl Sandbox {
    /// Backs up with the CLI (`backup --plan`), following the events; returns
    /// the terminal event kind, its report and the follower.
    pub async fn backup(&self, plan_toml: &str) -> (String, ProgressReport, Follower) {
        let broker = self.broker().await;
        let operation_id = Uuid::now_v7();
        let mut follower = Follower::bind(&broker, operation_id).await;
        let plan_file = self.write_file(&format!("plan-{operation_id}.toml"), plan_toml);
        let output = self.cli(&[
            "backup",
            "--plan",
            plan_file.to_str().expect("path"),
            "--operation-id",
            &operation_id.to_string(),
        ]);
        assert!(
            output.status.success(),
            "backup submit failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            operation_id.to_string()
        );
        let (kind, report) = follower.until_terminal(Duration::from_secs(240)).await;
        (kind, report, follower)
    }

    /// Runs a CLI command that submits an operation with `--operation-id`,
    /// following its events; returns the CLI's output and the terminal report.
    pub async fn submit(
        &self,
        args: &[&str],
    ) -> (Output, Option<(String, ProgressReport)>, Follower) {
        let broker = self.broker().await;
        let operation_id = Uuid::now_v7();
        let mut follower = Follower::bind(&broker, operation_id).await;
        let mut all: Vec<&str> = args.to_vec();
        let id = operation_id.to_string();
        all.extend_from_slice(&["--operation-id", &id]);
        let output = self.cli(&all);
        if !output.status.success() {
            return (output, None, follower);
        }
        let terminal = follower.until_terminal(Duration::from_secs(240)).await;
        (output, Some(terminal), follower)
    }
}

/// Follows the public events of one operation.
pub struct Follower {
    subscription: Subscription,
    /// Every report received, in order.
    pub reports: Vec<(String, ProgressReport)>,
}

impl Follower {
    /// Binds to `operation.<id>.#` (do it before submitting).
    pub async fn bind(broker: &Broker, operation_id: Uuid) -> Self {
        koan_transport::topology::declare_exchanges(broker.publisher())
            .await
            .expect("declaring the exchanges");
        let subscription = broker
            .follow(EVENTS_EXCHANGE, &[operation_follow_key(operation_id)])
            .await
            .expect("binding a follower");
        Self {
            subscription,
            reports: Vec::new(),
        }
    }

    /// Collects events until a terminal one (or `timeout`); returns the last.
    pub async fn until_terminal(&mut self, timeout: Duration) -> (String, ProgressReport) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let delivery = tokio::time::timeout_at(deadline, self.subscription.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no terminal event within {timeout:?}; last: {:?}",
                        self.reports.last()
                    )
                })
                .expect("follower delivery");
            delivery.ack().await.expect("ack");
            let event = koan_protocol::decode::<OperationEvent>(&delivery.payload)
                .expect("decoding an event");
            let kind = koan_protocol::Message::kind(&event).to_string();
            let report = event.report().clone();
            self.reports.push((kind.clone(), report.clone()));
            if report.state.is_terminal() {
                return (kind, report);
            }
        }
    }

    /// Keeps collecting events for `duration` (to catch late duplicates).
    pub async fn collect_for(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        while let Ok(Ok(delivery)) =
            tokio::time::timeout_at(deadline, self.subscription.next()).await
        {
            delivery.ack().await.expect("ack");
            let event = koan_protocol::decode::<OperationEvent>(&delivery.payload)
                .expect("decoding an event");
            let kind = koan_protocol::Message::kind(&event).to_string();
            self.reports.push((kind, event.report().clone()));
        }
    }

    /// Asserts percentages, in arrival order, never decrease and end at exactly 100.
    pub fn assert_monotonic_to_100(&self) {
        let mut last = 0.0;
        for (_, report) in &self.reports {
            assert!(
                report.percent >= last,
                "percent went from {last} to {} (sequence {})",
                report.percent,
                report.sequence
            );
            assert!(report.percent <= 100.0);
            if report.percent >= 100.0 {
                assert_eq!(
                    report.state,
                    koan_protocol::progress::OperationState::Completed,
                    "100% before completion"
                );
            }
            last = report.percent;
        }
        assert_eq!(last, 100.0, "the last percentage is {last}, not 100");
    }
}

impl Sandbox {
    /// Kills every process started so far (SIGKILL) and waits for each; their
    /// logs stay readable. Start new ones under other names.
    pub fn kill_all(&mut self) {
        for process in &mut self.processes {
            if let Ok(None) = process.child.try_wait() {
                let _ = process.child.kill();
            }
            let _ = process.child.wait();
        }
    }

    /// Starts one worker process named `name`, with extra arguments.
    pub fn spawn_worker(&mut self, name: &str, extra: &[&str]) {
        let mut args = vec!["worker"];
        args.extend_from_slice(extra);
        self.spawn(name, &args);
    }

    /// Starts `count` worker processes named `<prefix>-<i>`, with extra arguments.
    pub fn start_named_workers(&mut self, prefix: &str, count: usize, extra: &[&str]) {
        for index in 0..count {
            self.spawn_worker(&format!("{prefix}-{index}"), extra);
        }
    }
}
