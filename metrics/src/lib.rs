//! koan-metrics: the metrics of koan-backup's services.
//!
//! Services record through the OpenTelemetry metrics API (a [`Meter`] from
//! [`Metrics::meter`]). One SDK meter provider per process holds them and
//! has two readers:
//!
//! - a pull reader, read on each `GET /metrics` and rendered as Prometheus
//!   text ([`prometheus`]; the `opentelemetry-prometheus` exporter is
//!   discontinued, so the rendering is ours);
//! - when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   is set (and `OTEL_METRICS_EXPORTER` is not `none`), a periodic OTLP
//!   exporter (`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_METRIC_EXPORT_INTERVAL`
//!   and the other standard variables apply).
//!   A collector that cannot be reached never stops a service: the failed
//!   export is logged and the next interval tries again.
//!
//! [`init`] installs the process's provider once (also as OpenTelemetry's
//! global meter provider) and [`global`] returns it; [`endpoint::serve`]
//! answers `GET /metrics` and `GET /healthz` on an address.

#![warn(missing_docs)]

pub mod endpoint;
pub mod error;
pub mod prometheus;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{MetricExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use tracing::{debug, info, warn};

pub use endpoint::{Endpoint, parse_address, serve};
pub use error::MetricsError;
pub use opentelemetry::metrics::Meter;

/// The service name used when none was given to [`init`] (and `OTEL_SERVICE_NAME` is unset).
pub const DEFAULT_SERVICE_NAME: &str = "koan-backup";

/// Environment variables that turn on the OTLP export of metrics.
pub const OTLP_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// A meter provider and the pull reader that renders it.
#[derive(Clone)]
pub struct Metrics {
    provider: SdkMeterProvider,
    reader: PullReader,
    otlp: bool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Metrics")
            .field("otlp", &self.otlp)
            .finish_non_exhaustive()
    }
}

/// Where OTLP metrics go.
enum Otlp {
    /// Nowhere: only the pull reader.
    Off,
    /// Wherever the standard `OTEL_EXPORTER_OTLP_*` variables say.
    FromEnv,
    /// To this URL (the full metrics path), over http/protobuf.
    Endpoint(String),
}

impl Metrics {
    /// A provider read only by the pull reader (no OTLP export).
    pub fn new(service_name: &str) -> Self {
        Self::build(service_name, Otlp::Off)
    }

    /// A provider that also exports over OTLP when one of
    /// [`OTLP_ENDPOINT_VARIABLES`] is set in the environment.
    pub fn from_env(service_name: &str) -> Self {
        let otlp = if otlp_configured(|name| std::env::var(name).ok()) {
            Otlp::FromEnv
        } else {
            Otlp::Off
        };
        Self::build(service_name, otlp)
    }

    /// A provider that also exports over OTLP http/protobuf to `url` (the
    /// full metrics URL, for example `http://collector:4318/v1/metrics`).
    pub fn with_otlp_endpoint(service_name: &str, url: &str) -> Self {
        Self::build(service_name, Otlp::Endpoint(url.to_string()))
    }

    fn build(service_name: &str, otlp: Otlp) -> Self {
        let reader = PullReader(Arc::new(ManualReader::builder().build()));
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_string());
        }
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource.build())
            .with_reader(reader.clone());
        let exporter = otlp_exporter(&otlp);
        let exports = exporter.is_some();
        if let Some(exporter) = exporter {
            builder = builder.with_periodic_exporter(exporter);
        }
        Self {
            provider: builder.build(),
            reader,
            otlp: exports,
        }
    }

    /// A meter named `name` (the instrumentation scope, e.g. `koan-worker`).
    pub fn meter(&self, name: &'static str) -> Meter {
        self.provider.meter(name)
    }

    /// Whether metrics are also pushed over OTLP.
    pub fn exports_otlp(&self) -> bool {
        self.otlp
    }

    /// Every metric recorded so far, as Prometheus families.
    pub fn collect(&self) -> Result<Vec<prometheus::Family>, MetricsError> {
        let mut collected = ResourceMetrics::default();
        self.reader
            .collect(&mut collected)
            .map_err(|error| MetricsError::Collect(error.to_string()))?;
        Ok(prometheus::families(&collected))
    }

    /// Every metric recorded so far, in the Prometheus text format.
    pub fn render(&self) -> Result<String, MetricsError> {
        self.collect().map(|families| prometheus::render(&families))
    }

    /// Pushes what was recorded over OTLP now (when configured); the
    /// provider keeps running. Blocks like [`Metrics::shutdown`].
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            debug!(%error, "metrics flush");
        }
    }

    /// Pushes what is left over OTLP and stops the provider. Blocks up to
    /// the exporter's timeout: call it outside async code (for example in
    /// `spawn_blocking`).
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            debug!(%error, "metrics provider shutdown");
        }
    }
}

/// Whether `lookup` (an environment) asks for metrics over OTLP: it names an
/// endpoint ([`OTLP_ENDPOINT_VARIABLES`]) and `OTEL_METRICS_EXPORTER`, the
/// standard selector, is unset or lists `otlp` (`none` turns OTLP metrics
/// off while traces still go to the endpoint).
pub fn otlp_configured(lookup: impl Fn(&str) -> Option<String>) -> bool {
    let endpoint = OTLP_ENDPOINT_VARIABLES
        .iter()
        .any(|name| lookup(name).is_some_and(|value| !value.trim().is_empty()));
    let selected = lookup("OTEL_METRICS_EXPORTER").is_none_or(|exporters| {
        exporters.trim().is_empty()
            || exporters
                .split(',')
                .any(|exporter| exporter.trim().eq_ignore_ascii_case("otlp"))
    });
    endpoint && selected
}

fn otlp_exporter(otlp: &Otlp) -> Option<MetricExporter> {
    let built = match otlp {
        Otlp::Off => return None,
        Otlp::FromEnv => MetricExporter::builder().build(),
        Otlp::Endpoint(url) => MetricExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .build(),
    };
    match built {
        Ok(exporter) => {
            info!("metrics are exported over OTLP");
            Some(exporter)
        }
        Err(error) => {
            warn!(%error, "the OTLP metrics exporter could not be set up; metrics are served at /metrics only");
            None
        }
    }
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, created on the first call (from the environment,
/// see [`Metrics::from_env`]) and installed as OpenTelemetry's global meter
/// provider; later calls return the same one whatever name they pass.
pub fn init(service_name: &str) -> &'static Metrics {
    GLOBAL.get_or_init(|| {
        let metrics = Metrics::from_env(service_name);
        opentelemetry::global::set_meter_provider(metrics.provider.clone());
        metrics
    })
}

/// The process's metrics ([`init`] with [`DEFAULT_SERVICE_NAME`] if nothing
/// installed them yet).
pub fn global() -> &'static Metrics {
    init(DEFAULT_SERVICE_NAME)
}

/// Pushes the process's metrics over OTLP now, if they were installed and
/// OTLP is configured; they keep running. Blocks (see [`Metrics::shutdown`]).
pub fn flush() {
    if let Some(metrics) = GLOBAL.get() {
        metrics.flush();
    }
}

/// Flushes and stops the process's metrics, if they were installed. Blocks
/// (see [`Metrics::shutdown`]).
pub fn shutdown() {
    if let Some(metrics) = GLOBAL.get() {
        metrics.shutdown();
    }
}

/// The SDK's manual reader behind an `Arc`, so the provider owns one handle
/// and [`Metrics`] keeps another to collect on demand.
#[derive(Debug, Clone)]
struct PullReader(Arc<ManualReader>);

impl MetricReader for PullReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, metrics: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(metrics)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use opentelemetry::KeyValue;

    use super::*;

    #[test]
    fn renders_what_instruments_recorded() {
        let metrics = Metrics::new("test");
        let meter = metrics.meter("koan-test");
        let rows = meter
            .u64_counter("koan.test.rows")
            .with_description("Rows seen")
            .with_unit("{row}")
            .build();
        rows.add(5, &[KeyValue::new("entity", "orders")]);
        rows.add(2, &[KeyValue::new("entity", "orders")]);
        rows.add(1, &[KeyValue::new("entity", "in\"voices")]);
        let in_flight = meter.i64_up_down_counter("koan.test.in_flight").build();
        in_flight.add(2, &[]);
        in_flight.add(-1, &[]);
        let duration = meter
            .f64_histogram("koan.test.duration")
            .with_unit("s")
            .with_boundaries(vec![1.0, 10.0])
            .build();
        duration.record(0.5, &[]);
        duration.record(5.0, &[]);
        duration.record(50.0, &[]);
        let waiting = meter.u64_gauge("koan.test.waiting").build();
        waiting.record(7, &[KeyValue::new("pool", "default")]);

        let text = metrics.render().unwrap();
        for line in [
            "# HELP koan_test_rows_total Rows seen",
            "# TYPE koan_test_rows_total counter",
            "koan_test_rows_total{entity=\"in\\\"voices\"} 1",
            "koan_test_rows_total{entity=\"orders\"} 7",
            "# TYPE koan_test_in_flight gauge",
            "koan_test_in_flight 1",
            "# TYPE koan_test_duration_seconds histogram",
            "koan_test_duration_seconds_bucket{le=\"1\"} 1",
            "koan_test_duration_seconds_bucket{le=\"10\"} 2",
            "koan_test_duration_seconds_bucket{le=\"+Inf\"} 3",
            "koan_test_duration_seconds_sum 55.5",
            "koan_test_duration_seconds_count 3",
            "# TYPE koan_test_waiting gauge",
            "koan_test_waiting{pool=\"default\"} 7",
        ] {
            assert!(
                text.lines().any(|candidate| candidate == line),
                "missing `{line}` in\n{text}"
            );
        }
    }

    #[test]
    fn otlp_is_on_only_with_an_endpoint() {
        assert!(!otlp_configured(|_| None));
        assert!(!otlp_configured(|_| Some("  ".into())));
        assert!(otlp_configured(|name| {
            (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://collector:4318".into())
        }));
        assert!(otlp_configured(|name| {
            (name == "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
                .then(|| "http://collector:4318/v1/metrics".into())
        }));
        let with_exporter = |exporter: &'static str| {
            otlp_configured(move |name| match name {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".into()),
                "OTEL_METRICS_EXPORTER" => Some(exporter.into()),
                _ => None,
            })
        };
        assert!(!with_exporter("none"));
        assert!(!with_exporter("prometheus"));
        assert!(with_exporter("console, otlp"));
        assert!(!Metrics::new("test").exports_otlp());
    }
}
