//! Telemetry for every koan-backup process: logs on stderr (human, or JSON
//! with `KOAN_LOG_FORMAT=json`) and, when an OTLP endpoint is configured,
//! OpenTelemetry traces exported to it.
//!
//! # Layout
//! - [`settings`]: [`Settings`], what the environment asks for (`KOAN_LOG_FORMAT`,
//!   `RUST_LOG`, the standard `OTEL_*` variables).
//! - [`install`]: [`init`], the global subscriber (a log layer, and an
//!   OpenTelemetry layer only when traces are exported), and [`Telemetry`], the
//!   guard that flushes and shuts the exporter down when dropped.
//! - [`context`]: W3C trace context between spans and messages: the context of
//!   a span ([`context_of`], [`current`]) and a span made the child of a
//!   received one ([`adopt`]).
//! - [`span`]: results and failures recorded on spans ([`record_failure`]).
//! - [`fields`]: human log lines without the exporter's `otel.*` fields.
//!
//! # Without an endpoint
//! With neither `OTEL_EXPORTER_OTLP_ENDPOINT` nor
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, no OpenTelemetry layer is
//! installed: spans are plain `tracing` spans, nothing is exported, no trace
//! ids exist and no trace headers are added to messages.

pub mod context;
pub mod fields;
pub mod install;
pub mod settings;
pub mod span;

pub use context::{adopt, context_of, current, trace_id};
pub use install::{Telemetry, init};
pub use settings::{LogFormat, Settings};
pub use span::record_failure;

/// The trace context type carried in message headers (re-exported from the protocol).
pub use koan_protocol::trace::TraceContext;
