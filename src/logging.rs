//! Log output and trace export, installed by `koan_telemetry`: logs on
//! stderr, human-readable by default, JSON with `KOAN_LOG_FORMAT=json`, level
//! from `RUST_LOG` (default `info`; `warn` in embedded mode); traces exported
//! over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not at all otherwise.

use koan_telemetry::{Settings, Telemetry};

use crate::Command;

/// Installs the global subscriber, at `default_filter` unless `RUST_LOG` is
/// set, naming exported spans' service `service` unless `OTEL_SERVICE_NAME`
/// does. Keep the guard until the end: dropping it flushes the last spans.
pub fn init(default_filter: &str, service: &str) -> Telemetry {
    koan_telemetry::init(&Settings::from_env(default_filter, service))
}

/// The service name of a process running `command`: its role.
pub fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Coordinator(_) => "koan-coordinator",
        Command::Worker(_) => "koan-worker",
        _ => "koan-backup",
    }
}
