//! Outcomes recorded on spans, the OpenTelemetry way: a failure sets the
//! span's status to error with the reason, names its code in `error.type`
//! and adds an `exception` event. Without the OpenTelemetry layer these are
//! no-ops (the log line that accompanies a failure says the same).

use opentelemetry::KeyValue;
use opentelemetry::trace::Status;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Marks `span` failed: status error with `reason`, `error.type` = `code`,
/// and an `exception` event carrying both.
pub fn record_failure(span: &Span, code: &str, reason: &str) {
    span.set_status(Status::error(reason.to_string()));
    span.set_attribute("error.type", code.to_string());
    span.add_event(
        "exception",
        vec![
            KeyValue::new("exception.type", code.to_string()),
            KeyValue::new("exception.message", reason.to_string()),
        ],
    );
}
