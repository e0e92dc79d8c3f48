//! The coordinator's spans: one per delivery handled, each the child of the
//! span that published the delivery (its `traceparent` header).
//!
//! | span (`otel.name`) | for | attributes |
//! |---|---|---|
//! | the command kind (`start_backup`, `verify`, `status`…) | a client command | `operation_id` once known, `outcome` (`accepted`, `rejected`…) |
//! | the report kind (`entity_planned`, `chunk_done`…) | a worker report | `operation_id`, `entity`, `chunk`, `outcome` (`applied`, or why not) |
//! | `dead_letter` | a dead-lettered message | `kind`, `reason`, `outcome` |
//!
//! Inside a command span, `record_operation` covers the state store
//! transaction that records an operation and queues its first jobs, and
//! `check_catalog` the source catalog check of a plan. Progress reports
//! (`chunk_progress`, `verify_progress`) get `debug` spans, which are not
//! exported: they arrive every second per running chunk and say nothing a
//! `part_written` or `chunk_done` does not.
//!
//! Every span declares `trace_id`, so each log line inside names its trace.

use tracing::{Level, Span, field};

use koan_protocol::events::WorkerEvent;
use koan_transport::Incoming;

/// The report kinds whose spans are `debug` (not exported).
const CHATTY_REPORTS: [&str; 2] = ["chunk_progress", "verify_progress"];

/// The span of one client command.
pub fn command_span(incoming: &Incoming) -> Span {
    let kind = incoming.kind.as_deref().unwrap_or("command");
    let span = tracing::info_span!(
        "command",
        otel.name = kind,
        otel.kind = "consumer",
        kind,
        operation_id = field::Empty,
        outcome = field::Empty,
        trace_id = field::Empty,
    );
    koan_telemetry::adopt(&span, incoming.trace_context().as_ref());
    span
}

/// The span of one worker report.
pub fn report_span(incoming: &Incoming) -> Span {
    let kind = incoming.kind.as_deref().unwrap_or("report");
    let span = if CHATTY_REPORTS.contains(&kind) {
        report(Level::DEBUG, kind)
    } else {
        report(Level::INFO, kind)
    };
    koan_telemetry::adopt(&span, incoming.trace_context().as_ref());
    span
}

fn report(level: Level, kind: &str) -> Span {
    macro_rules! report_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "report",
                otel.name = kind,
                otel.kind = "consumer",
                kind,
                operation_id = field::Empty,
                entity = field::Empty,
                chunk = field::Empty,
                outcome = field::Empty,
                trace_id = field::Empty,
            )
        };
    }
    if level == Level::DEBUG {
        report_span!(Level::DEBUG)
    } else {
        report_span!(Level::INFO)
    }
}

/// The span of one dead-lettered message.
pub fn dead_letter_span(incoming: &Incoming) -> Span {
    let span = tracing::info_span!(
        "dead_letter",
        otel.kind = "consumer",
        kind = incoming.kind.as_deref().unwrap_or("unknown"),
        operation_id = field::Empty,
        reason = field::Empty,
        outcome = field::Empty,
        trace_id = field::Empty,
    );
    koan_telemetry::adopt(&span, incoming.trace_context().as_ref());
    span
}

/// Records on `span` what a worker report is about: its operation, and its
/// entity and chunk (or restore unit) when it names them.
pub fn record_report(span: &Span, event: &WorkerEvent) {
    span.record("operation_id", field::display(event.operation_id()));
    let (entity, chunk) = match event {
        WorkerEvent::EntityPlanned(event) => (Some(event.entity.name.as_str()), None),
        WorkerEvent::EntityFailed(event) => (Some(event.entity.as_str()), None),
        WorkerEvent::ClaimChunk(event) => (Some(event.entity.as_str()), Some(event.chunk)),
        WorkerEvent::ChunkProgress(event) => (Some(event.entity.as_str()), Some(event.chunk)),
        WorkerEvent::PartWritten(event) => (Some(event.entity.as_str()), Some(event.chunk)),
        WorkerEvent::ChunkDone(event) => (Some(event.entity.as_str()), Some(event.chunk)),
        WorkerEvent::ChunkFailed(event) => (Some(event.entity.as_str()), Some(event.chunk)),
        WorkerEvent::PartImported(event) => (Some(event.entity.as_str()), Some(event.unit)),
        WorkerEvent::ImportFailed(event) => (Some(event.entity.as_str()), Some(event.unit)),
        WorkerEvent::RestoreApplied(event) => (Some(event.entity.as_str()), None),
        _ => (None, None),
    };
    if let Some(entity) = entity {
        span.record("entity", entity);
    }
    if let Some(chunk) = chunk {
        span.record("chunk", i64::from(chunk));
    }
}
