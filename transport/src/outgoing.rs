//! A message ready to publish.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use uuid::Uuid;

use koan_protocol::codec::{CONTENT_TYPE, Message};
use koan_protocol::error::ProtocolError;
use koan_protocol::topology::TRACEPARENT_HEADER;
use koan_protocol::trace::TraceContext;

/// One message: where it goes, its body and its AMQP properties.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Envelope bytes.
    pub payload: Vec<u8>,
    /// Message kind (the AMQP `type` property).
    pub kind: String,
    /// `message_id` property.
    pub message_id: String,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// Extra string headers (trace context, dead-letter reasons).
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    /// Encodes `message` for `exchange` / `routing_key`.
    pub fn encode<M: Message>(
        exchange: &str,
        routing_key: impl Into<String>,
        message: &M,
    ) -> Result<Self, ProtocolError> {
        Ok(Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.into(),
            payload: message.encode_envelope()?,
            kind: message.kind().to_string(),
            message_id: Uuid::now_v7().to_string(),
            correlation_id: None,
            reply_to: None,
            headers: Vec::new(),
        })
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Adds a string header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Carries `trace` (its `traceparent` and `tracestate` headers) instead of
    /// the trace context of the span that publishes it.
    pub fn trace(mut self, trace: Option<&TraceContext>) -> Self {
        if let Some(trace) = trace {
            self.headers.extend(trace.headers());
        }
        self
    }

    /// The trace context the message carries explicitly, if any.
    pub fn trace_context(&self) -> Option<TraceContext> {
        let header = |name: &str| {
            self.headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.as_str())
        };
        TraceContext::from_headers(header)
    }

    /// The AMQP properties: persistent, msgpack, with type, ids and headers.
    /// A message that carries no `traceparent` of its own gets the trace
    /// context of the span publishing it (none without trace export).
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        let mut pairs = self.headers.clone();
        if !self
            .headers
            .iter()
            .any(|(name, _)| name == TRACEPARENT_HEADER)
            && let Some(trace) = koan_telemetry::current()
        {
            pairs.extend(trace.headers());
        }
        for (name, value) in &pairs {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(self.kind.as_str().into())
            .with_message_id(self.message_id.as_str().into())
            .with_delivery_mode(2)
            .with_timestamp(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_secs())
                    .unwrap_or_default(),
            )
            .with_headers(headers);
        if let Some(correlation_id) = &self.correlation_id {
            properties = properties.with_correlation_id(correlation_id.as_str().into());
        }
        if let Some(reply_to) = &self.reply_to {
            properties = properties.with_reply_to(reply_to.as_str().into());
        }
        properties
    }
}
