//! Installing the global subscriber, and the guard that flushes traces.
//!
//! Two layers share one registry, each with its own filter:
//! - the log layer (human or JSON lines on stderr), filtered by `RUST_LOG`
//!   or the process's default;
//! - the OpenTelemetry layer, only when an OTLP endpoint is configured,
//!   fed with the spans and events of koan-backup's own crates at `info` and
//!   above whatever `RUST_LOG` says (embedded mode logs only warnings, yet
//!   exports its spans), and never with the exporter's or the HTTP client's
//!   own, which would feed back into it.
//!
//! Spans are exported in batches from a background thread; a collector that
//! cannot be reached costs an error line per failed batch (logged by the
//! OpenTelemetry SDK under `opentelemetry_sdk`) and nothing else.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{debug, warn};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::fields::HumanFields;
use crate::settings::{Export, LogFormat, Protocol, Settings};

/// How long flushing the last spans may take at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The crates whose spans and events are exported.
const TRACED_CRATES: [&str; 7] = [
    "koan_backup",
    "koan_coordinator",
    "koan_worker",
    "koan_transport",
    "koan_source",
    "koan_telemetry",
    "koan_protocol",
];

/// Instrumentation scope of the exported spans.
const TRACER_NAME: &str = "koan-backup";

/// Telemetry of this process: flushes and shuts the trace exporter down when
/// dropped (or on [`Telemetry::shutdown`]). Keep it alive until the end of `main`.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes the spans not yet exported and stops the exporter; a failure
    /// (collector unreachable, timeout) is logged, never returned.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let endpoint = self.endpoint.take().unwrap_or_default();
        match provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            Ok(()) => debug!(%endpoint, "traces flushed"),
            Err(error) => {
                warn!(%endpoint, %error, "the last traces could not be exported")
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber as `settings` ask. With an OTLP endpoint,
/// builds the exporter (gRPC needs a Tokio runtime entered on this thread);
/// an exporter that cannot be built is logged and the process goes on
/// without traces. A subscriber installed earlier (tests) is left in place.
pub fn init(settings: &Settings) -> Telemetry {
    let log_filter = EnvFilter::try_new(&settings.log_filter)
        .unwrap_or_else(|_| EnvFilter::new(LevelFilter::INFO.to_string()));
    let log_layer = match settings.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .fmt_fields(HumanFields)
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
    };
    let (provider, build_error) = match &settings.export {
        Some(export) => match tracer_provider(export) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
        None => (None, None),
    };
    let otel_layer = provider.as_ref().map(|provider| {
        let traced = TRACED_CRATES.iter().fold(Targets::new(), |targets, name| {
            targets.with_target(*name, LevelFilter::INFO)
        });
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(TRACER_NAME))
            .with_filter(traced)
    });
    let installed = Registry::default()
        .with(log_layer.with_filter(log_filter))
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Another subscriber is in place (a test harness): it keeps the
        // logs; spans of this one would go nowhere, so do not export.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Telemetry {
            provider: None,
            endpoint: None,
        };
    }
    for note in &settings.notes {
        warn!("{note}");
    }
    if let (Some(export), Some(error)) = (&settings.export, build_error) {
        warn!(endpoint = %export.endpoint, protocol = export.protocol.as_str(), %error,
            "the trace exporter could not be built; running without traces");
    }
    let endpoint = settings
        .export
        .as_ref()
        .map(|export| export.endpoint.clone());
    if let (Some(endpoint), Some(export)) = (&endpoint, &settings.export)
        && provider.is_some()
    {
        debug!(%endpoint, protocol = export.protocol.as_str(), "exporting traces");
    }
    Telemetry { provider, endpoint }
}

/// A tracer provider exporting in batches to the configured OTLP endpoint
/// (the exporter reads the endpoint, protocol, headers and timeout from the
/// `OTEL_EXPORTER_OTLP_*` variables; the SDK reads the sampler and resource ones).
fn tracer_provider(
    export: &Export,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match export.protocol {
        Protocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
        #[cfg(feature = "grpc")]
        Protocol::Grpc => builder.with_tonic().build()?,
        #[cfg(not(feature = "grpc"))]
        Protocol::Grpc => builder.with_http().build()?,
    };
    let mut resource = Resource::builder();
    if let Some(service) = &export.default_service_name {
        resource = resource.with_service_name(service.clone());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
