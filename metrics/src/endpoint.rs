//! The HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /healthz`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::MetricsError;
use crate::{Metrics, prometheus};

/// The endpoint address a setting names: `None` for `off` or an empty value,
/// else an `IP:PORT` (port 0 picks a free port; the bound one is logged).
pub fn parse_address(text: &str) -> Result<Option<SocketAddr>, MetricsError> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    trimmed
        .parse()
        .map(Some)
        .map_err(|_| MetricsError::BadAddress {
            address: text.to_string(),
        })
}

/// A running endpoint; it stops when dropped (or on [`Endpoint::stop`]).
#[derive(Debug)]
pub struct Endpoint {
    address: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// The address it listens on (the bound port when 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving and waits for open requests to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `address` and serves `metrics` there in a background task.
/// An address that cannot be bound is an error naming it.
pub async fn serve(address: SocketAddr, metrics: Metrics) -> Result<Endpoint, MetricsError> {
    let bind_error = |error| MetricsError::Bind {
        address: address.to_string(),
        error,
    };
    let listener = TcpListener::bind(address).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let app = router(metrics);
    let task = tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned());
        if let Err(error) = serving.await {
            warn!(address = %bound, %error, "the metrics endpoint stopped");
        }
    });
    info!(address = %bound, "metrics endpoint listening (GET /metrics, GET /healthz)");
    Ok(Endpoint {
        address: bound,
        stop,
        task: Some(task),
    })
}

/// The endpoint's routes over `metrics`.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Metrics>) -> Response {
    match metrics.render() {
        Ok(text) => ([(CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use axum::routing::post;
    use opentelemetry::KeyValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn get_text(address: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let metrics = Metrics::new("test");
        metrics
            .meter("koan-test")
            .u64_counter("koan.test.exported.bytes")
            .with_unit("By")
            .build()
            .add(1024, &[KeyValue::new("form", "raw")]);
        let endpoint = serve("127.0.0.1:0".parse().unwrap(), metrics)
            .await
            .unwrap();
        let address = endpoint.address();
        assert_ne!(address.port(), 0);

        let response = get_text(address, "/metrics").await;
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        assert!(
            response.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{response}"
        );
        assert!(
            response.contains("\nkoan_test_exported_bytes_total{form=\"raw\"} 1024\n"),
            "{response}"
        );
        let health = get_text(address, "/healthz").await;
        assert!(
            health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"),
            "{health}"
        );
        let missing = get_text(address, "/nothing").await;
        assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");

        endpoint.stop().await;
        assert!(TcpStream::connect(address).await.is_err());
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error_naming_it() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = taken.local_addr().unwrap();
        let error = serve(address, Metrics::new("test")).await.unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot serve metrics on {address}: ")),
            "{message}"
        );
    }

    #[test]
    fn addresses_are_ip_and_port_or_off() {
        assert_eq!(parse_address("off").unwrap(), None);
        assert_eq!(parse_address(" ").unwrap(), None);
        assert_eq!(
            parse_address("0.0.0.0:9464").unwrap(),
            Some("0.0.0.0:9464".parse().unwrap())
        );
        assert_eq!(
            parse_address("[::1]:0").unwrap(),
            Some("[::1]:0".parse().unwrap())
        );
        let error = parse_address("localhost").unwrap_err();
        assert!(error.to_string().contains("`localhost`"), "{error}");
    }

    /// A collector on a thread of its own (the OTLP client blocks), counting
    /// the metric exports it receives.
    fn fake_collector() -> (SocketAddr, Arc<AtomicUsize>) {
        let received = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&received);
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                address_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().route(
                    "/v1/metrics",
                    post(move |body: axum::body::Bytes| {
                        let counted = Arc::clone(&counted);
                        async move {
                            if !body.is_empty() {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            StatusCode::OK
                        }
                    }),
                );
                axum::serve(listener, app).await.unwrap();
            });
        });
        (address_rx.recv().unwrap(), received)
    }

    #[test]
    fn exports_over_otlp_and_shrugs_off_a_missing_collector() {
        let (address, received) = fake_collector();
        let metrics = Metrics::with_otlp_endpoint("test", &format!("http://{address}/v1/metrics"));
        assert!(metrics.exports_otlp());
        metrics
            .meter("koan-test")
            .u64_counter("koan.test.rows")
            .build()
            .add(3, &[]);
        metrics.shutdown();
        assert!(received.load(Ordering::SeqCst) >= 1, "no export received");

        // Nothing listens there: recording, rendering and stopping still work.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nowhere = closed.local_addr().unwrap();
        drop(closed);
        let metrics = Metrics::with_otlp_endpoint("test", &format!("http://{nowhere}/v1/metrics"));
        metrics
            .meter("koan-test")
            .u64_counter("koan.test.rows")
            .build()
            .add(3, &[]);
        assert!(metrics.render().unwrap().contains("koan_test_rows_total 3"));
        let started = Instant::now();
        metrics.shutdown();
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
