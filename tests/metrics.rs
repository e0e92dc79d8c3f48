//! Metrics, end to end: a coordinator and two workers as processes of the
//! built binary, each serving `/metrics` on a port of its own. During a
//! backup every endpoint answers in the Prometheus text format with the
//! documented metric names; at the end the workers' exported rows and bytes
//! add up to the manifest's totals, and so do the coordinator's figures.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use koan_protocol::progress::OperationState;
use support::{Sandbox, archive, data};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `GET path` on `port`: the body of a 200 answer, with its content type.
async fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    Some((content_type, body.to_string()))
}

/// The samples of a Prometheus text body: (name, labels) → value. Checks
/// that every line is a comment or a well-formed sample.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            value => value
                .parse()
                .unwrap_or_else(|_| panic!("not a value in: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels = labels
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label in: {line}"));
                        (key.to_string(), value.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        samples.push((name, labels, value));
    }
    samples
}

/// The sum of the samples of `name` whose labels include `filter`.
fn sum(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(sample, labels, _)| {
            sample == name
                && filter
                    .iter()
                    .all(|(key, value)| labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// Whether the body declares every one of `families` with its type.
fn declares(text: &str, families: &[(&str, &str)]) -> bool {
    families.iter().all(|(name, kind)| {
        text.lines()
            .any(|line| line == format!("# TYPE {name} {kind}"))
            && text
                .lines()
                .any(|line| line.starts_with(&format!("# HELP {name} ")))
    })
}

const COORDINATOR_LIVE: [(&str, &str); 4] = [
    ("koan_coordinator_pool_jobs_waiting", "gauge"),
    ("koan_coordinator_pool_jobs_running", "gauge"),
    ("koan_coordinator_pool_oldest_waiting_seconds", "gauge"),
    ("koan_coordinator_operations", "gauge"),
];

const WORKER_LIVE: [(&str, &str); 7] = [
    ("koan_worker_exported_rows_total", "counter"),
    ("koan_worker_exported_bytes_total", "counter"),
    ("koan_worker_chunk_duration_seconds", "histogram"),
    ("koan_worker_job_duration_seconds", "histogram"),
    ("koan_worker_jobs_in_flight", "gauge"),
    ("koan_worker_retries_total", "counter"),
    ("koan_worker_dead_lettered_total", "counter"),
];

const COORDINATOR_ENDED: [(&str, &str); 3] = [
    ("koan_coordinator_operation_duration_seconds", "histogram"),
    ("koan_coordinator_operation_rows_total", "counter"),
    ("koan_coordinator_operation_bytes_total", "counter"),
];

/// What the scraper saw while the backup ran.
#[derive(Default)]
struct Seen {
    coordinator: Vec<String>,
    workers: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_backup_and_agree_with_its_manifest() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 200_000, 2).await;
    sandbox.set_env("KOAN_METRICS_INTERVAL_MS", "100");
    let coordinator_port = free_port();
    let coordinator_address = format!("127.0.0.1:{coordinator_port}");
    sandbox.start_coordinator(
        "coordinator",
        &[
            "--metrics-addr",
            &coordinator_address,
            "--part-bytes",
            "1048576",
        ],
    );
    let worker_ports = [free_port(), free_port()];
    for (index, port) in worker_ports.iter().enumerate() {
        let address = format!("127.0.0.1:{port}");
        sandbox.spawn_worker(&format!("worker-{index}"), &["--metrics-addr", &address]);
    }
    let ports: Vec<u16> = std::iter::once(coordinator_port)
        .chain(worker_ports)
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for port in &ports {
        while get(*port, "/healthz").await.map(|(_, body)| body) != Some("ok\n".to_string()) {
            sandbox.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no /healthz on port {port}\n{}",
                sandbox.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Scrape every endpoint while the backup runs.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let scraping = tokio_util::sync::CancellationToken::new();
    let scraper = {
        let seen = Arc::clone(&seen);
        let scraping = scraping.clone();
        tokio::spawn(async move {
            while !scraping.is_cancelled() {
                for port in &ports {
                    if let Some((content_type, body)) = get(*port, "/metrics").await {
                        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
                        let mut seen = seen.lock().expect("scrapes");
                        if *port == coordinator_port {
                            seen.coordinator.push(body);
                        } else {
                            seen.workers.push(body);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let plan = r#"
        plan_id = "orders:metrics"
        [[entities]]
        name = "orders"
        table = "Order"
        bucket = "orders"
        scope = "tenant-1"
        chunk_rows = 5000
        version = "$.version"
    "#;
    let (kind, report, _follower) = sandbox.backup(plan).await;
    scraping.cancel();
    scraper.await.expect("the scraper");
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    assert_eq!(report.state, OperationState::Completed);

    let seen = std::mem::take(&mut *seen.lock().expect("scrapes"));
    let live_coordinator = seen.coordinator.iter().find(|text| {
        declares(text, &COORDINATOR_LIVE)
            && sum(
                text,
                "koan_coordinator_pool_jobs_waiting",
                &[("pool", "default")],
            ) + sum(
                text,
                "koan_coordinator_pool_jobs_running",
                &[("pool", "default")],
            ) > 0.0
            && sum(
                text,
                "koan_coordinator_operations",
                &[("kind", "backup"), ("state", "running")],
            ) == 1.0
    });
    assert!(
        live_coordinator.is_some(),
        "no coordinator scrape during the backup showed its jobs ({} scrapes); last:\n{}",
        seen.coordinator.len(),
        seen.coordinator.last().map_or("", String::as_str)
    );
    let live_worker = seen.workers.iter().find(|text| {
        declares(text, &WORKER_LIVE)
            && sum(
                text,
                "koan_worker_exported_rows_total",
                &[("entity", "orders")],
            ) > 0.0
    });
    assert!(
        live_worker.is_some(),
        "no worker scrape during the backup showed exported rows ({} scrapes); last:\n{}",
        seen.workers.len(),
        seen.workers.last().map_or("", String::as_str)
    );

    // At the end: the workers' figures add up to the manifest's totals.
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest path"),
    );
    let totals = &manifest.totals;
    assert!(totals.rows >= 100_000 && totals.parts > totals.chunks);
    let mut exported = [0.0; 3];
    let mut chunks_timed = 0.0;
    for port in worker_ports {
        // The finalize job is acked just after its report: wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (_, text) = get(port, "/metrics").await.expect("worker metrics");
            if sum(&text, "koan_worker_jobs_in_flight", &[]) == 0.0 {
                break text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "jobs still in flight:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        exported[0] += sum(&text, "koan_worker_exported_rows_total", &[]);
        exported[1] += sum(
            &text,
            "koan_worker_exported_bytes_total",
            &[("form", "raw")],
        );
        exported[2] += sum(
            &text,
            "koan_worker_exported_bytes_total",
            &[("form", "compressed")],
        );
        chunks_timed += sum(
            &text,
            "koan_worker_chunk_duration_seconds_count",
            &[("outcome", "done")],
        );
        assert_eq!(sum(&text, "koan_worker_dead_lettered_total", &[]), 0.0);
    }
    assert_eq!(
        exported,
        [
            totals.rows as f64,
            totals.raw_bytes as f64,
            totals.compressed_bytes as f64
        ],
        "workers' rows, raw and compressed bytes against the manifest"
    );
    assert_eq!(chunks_timed, totals.chunks as f64);

    // And the coordinator's, once it took the ended backup (every 100 ms).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let completed = [("kind", "backup"), ("state", "completed")];
    let text = loop {
        let (_, text) = get(coordinator_port, "/metrics")
            .await
            .expect("coordinator metrics");
        if sum(
            &text,
            "koan_coordinator_operation_duration_seconds_count",
            &completed,
        ) == 1.0
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator never recorded the ended backup:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(declares(&text, &COORDINATOR_ENDED), "{text}");
    assert_eq!(
        [
            sum(&text, "koan_coordinator_operation_rows_total", &completed),
            sum(
                &text,
                "koan_coordinator_operation_bytes_total",
                &[("kind", "backup"), ("state", "completed"), ("form", "raw")]
            ),
            sum(
                &text,
                "koan_coordinator_operation_bytes_total",
                &[
                    ("kind", "backup"),
                    ("state", "completed"),
                    ("form", "compressed")
                ]
            ),
        ],
        [
            totals.rows as f64,
            totals.raw_bytes as f64,
            totals.compressed_bytes as f64
        ],
        "coordinator's rows, raw and compressed bytes against the manifest"
    );
    let duration = sum(
        &text,
        "koan_coordinator_operation_duration_seconds_sum",
        &completed,
    );
    assert!(duration > 0.0 && duration < 600.0, "{duration}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(coordinator_port, "/metrics")
            .await
            .expect("coordinator metrics");
        let settled = sum(&text, "koan_coordinator_operations", &completed) == 1.0
            && sum(&text, "koan_coordinator_pool_jobs_waiting", &[]) == 0.0
            && sum(&text, "koan_coordinator_pool_oldest_waiting_seconds", &[]) == 0.0;
        if settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator's gauges did not settle:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if std::env::var_os("KOAN_PRINT_METRICS").is_some() {
        let (_, worker) = get(worker_ports[0], "/metrics")
            .await
            .expect("worker metrics");
        for (what, body) in [
            (
                "coordinator, during the backup",
                live_coordinator.map(String::as_str),
            ),
            (
                "a worker, during the backup",
                live_worker.map(String::as_str),
            ),
            ("coordinator, at the end", Some(text.as_str())),
            ("worker-0, at the end", Some(worker.as_str())),
        ] {
            println!("----- {what}\n{}", body.unwrap_or_default());
        }
    }
    sandbox.assert_alive();
}
