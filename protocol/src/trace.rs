//! W3C trace context as it travels with messages: the `traceparent` and
//! `tracestate` AMQP headers ([`TRACEPARENT_HEADER`], [`TRACESTATE_HEADER`]).
//!
//! A [`TraceContext`] is plain text, checked for shape only: this crate knows
//! nothing of tracing libraries. The coordinator stores one with every
//! operation so the jobs it publishes later still belong to the trace of the
//! command that started the operation.

use crate::topology::{TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// Longest `tracestate` kept (the W3C limit is 32 members of at most 256 bytes;
/// anything longer is dropped rather than truncated mid-member).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The trace context of one span: the W3C `traceparent` (version 00) and
/// optional `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// A context from header values; `None` when `traceparent` is not a
    /// version-00 `traceparent` with non-zero trace and span ids. An empty or
    /// oversized `tracestate` is dropped.
    pub fn new(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent.trim();
        if !is_traceparent(traceparent) {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE_BYTES)
            .map(str::to_string);
        Some(Self {
            traceparent: traceparent.to_ascii_lowercase(),
            tracestate,
        })
    }

    /// A context read through `header`, which answers a header's value by name.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        Self::new(header(TRACEPARENT_HEADER)?, header(TRACESTATE_HEADER))
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, when there is one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id: 16 lowercase hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// The headers that carry this context, `traceparent` first.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![(TRACEPARENT_HEADER.to_string(), self.traceparent.clone())];
        if let Some(state) = &self.tracestate {
            headers.push((TRACESTATE_HEADER.to_string(), state.clone()));
        }
        headers
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, neither id all zeros.
fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, span_id, flags] = parts.as_slice() else {
        return false;
    };
    let hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|byte| byte.is_ascii_hexdigit())
    };
    let non_zero = |text: &str| text.bytes().any(|byte| byte != b'0');
    *version == "00"
        && hex(trace_id, 32)
        && non_zero(trace_id)
        && hex(span_id, 16)
        && non_zero(span_id)
        && hex(flags, 2)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_a_w3c_traceparent() {
        let context = TraceContext::new(PARENT, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(
            context.headers(),
            vec![
                ("traceparent".to_string(), PARENT.to_string()),
                ("tracestate".to_string(), "congo=t61rcWkgMzE".to_string()),
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_a_traceparent() {
        for bad in [
            "",
            "00-trace",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceContext::new(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn drops_an_empty_or_oversized_tracestate() {
        let empty = TraceContext::new(PARENT, Some(" ")).unwrap();
        assert_eq!(empty.tracestate(), None);
        let long = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(
            TraceContext::new(PARENT, Some(&long)).unwrap().tracestate(),
            None
        );
    }

    #[test]
    fn reads_headers_by_name() {
        let context = TraceContext::from_headers(|name| match name {
            "traceparent" => Some(PARENT),
            _ => None,
        })
        .unwrap();
        assert_eq!(context.traceparent(), PARENT);
        assert!(TraceContext::from_headers(|_| None).is_none());
    }
}
