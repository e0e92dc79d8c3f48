//! W3C trace context between `tracing` spans and message headers.
//!
//! A message carries the context of the span that published it
//! ([`context_of`], [`current`]); the span that handles it on the other side
//! is made that span's child ([`adopt`]). Without the OpenTelemetry layer
//! (no OTLP endpoint) spans have no context: [`context_of`] answers `None`
//! and [`adopt`] only records the trace id the message carried, if any.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use koan_protocol::topology::{TRACEPARENT_HEADER, TRACESTATE_HEADER};
use koan_protocol::trace::TraceContext;

/// The field, declared `tracing::field::Empty` on every span passed to
/// [`adopt`], that log lines show the trace id in.
pub const TRACE_ID_FIELD: &str = "trace_id";

/// The trace context of `span`, when it belongs to a trace.
pub fn context_of(span: &Span) -> Option<TraceContext> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    TraceContext::new(
        carrier.get(TRACEPARENT_HEADER)?,
        carrier.get(TRACESTATE_HEADER).map(String::as_str),
    )
}

/// The trace context of the current span, when it belongs to a trace.
pub fn current() -> Option<TraceContext> {
    context_of(&Span::current())
}

/// The trace id of `span` (32 hex digits), when it belongs to a trace.
pub fn trace_id(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Makes `span` the child of the remote span `parent` (a root of its own
/// trace without one) and records its trace id in its `trace_id` field.
/// Call it before the span is entered or its context read: a started span's
/// parent can no longer change.
pub fn adopt(span: &Span, parent: Option<&TraceContext>) {
    let remote = parent.map_or_else(Context::new, extract);
    // Fails only without the OpenTelemetry layer, or for a disabled or started span.
    let _ = span.set_parent(remote);
    let id = trace_id(span).or_else(|| parent.map(|parent| parent.trace_id().to_string()));
    if let Some(id) = id {
        span.record(TRACE_ID_FIELD, id);
    }
}

/// The OpenTelemetry context `trace` stands for.
fn extract(trace: &TraceContext) -> Context {
    let carrier: HashMap<String, String> = trace.headers().into_iter().collect();
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_otel<T>(body: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, body)
    }

    #[test]
    fn a_span_adopts_the_remote_parent_and_passes_the_trace_on() {
        with_otel(|| {
            let parent = TraceContext::new(PARENT, Some("vendor=1")).unwrap();
            let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
            adopt(&span, Some(&parent));
            assert_eq!(
                trace_id(&span).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let child = context_of(&span).unwrap();
            assert_eq!(child.trace_id(), parent.trace_id());
            assert_ne!(child.span_id(), parent.span_id(), "a span of its own");
            assert_eq!(child.tracestate(), Some("vendor=1"));
            let inner = span.in_scope(current).unwrap();
            assert_eq!(inner.span_id(), child.span_id());
        });
    }

    #[test]
    fn without_a_parent_a_span_starts_a_trace() {
        with_otel(|| {
            let outer = tracing::info_span!("outer");
            let _entered = outer.enter();
            let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
            adopt(&span, None);
            let root = context_of(&span).unwrap();
            assert_ne!(
                Some(root.trace_id()),
                context_of(&outer).as_ref().map(TraceContext::trace_id)
            );
        });
    }

    #[test]
    fn without_the_layer_there_is_no_context() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
            adopt(&span, None);
            assert_eq!(context_of(&span), None);
            assert_eq!(trace_id(&span), None);
        });
    }
}
