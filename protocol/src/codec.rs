//! The msgpack envelope every message travels in.
//!
//! On the wire a message is a msgpack map with named fields:
//! `{"protocol": 1, "kind": "<kind>", "body": {...}}`. Bodies are maps too, so
//! fields can be added without breaking older readers. UUIDs and timestamps
//! are strings (RFC 4122 and RFC 3339), so any msgpack library can read and
//! write them. Decoding checks the version first, then the kind, then the
//! body, and names what was wrong.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::ProtocolError;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The MIME type of every message body.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// A family of messages sharing one channel (commands, jobs, events...).
pub trait Message: Sized {
    /// Family name used in errors (`command`, `job`, ...).
    const FAMILY: &'static str;
    /// Every kind of the family, as written in the envelope.
    const KINDS: &'static [&'static str];
    /// The kind of this message, as written in the envelope.
    fn kind(&self) -> &'static str;
    /// Encodes the message in its envelope.
    fn encode_envelope(&self) -> Result<Vec<u8>, ProtocolError>;
    /// Decodes the body of a message whose envelope names `kind`.
    fn decode_body(kind: &str, bytes: &[u8]) -> Result<Self, ProtocolError>;
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    protocol: u32,
    kind: &'a str,
    body: &'a T,
}

#[derive(Deserialize)]
struct Header {
    protocol: u32,
    kind: String,
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[allow(dead_code)]
    protocol: u32,
    #[allow(dead_code)]
    kind: String,
    body: T,
}

/// Encodes `message` in its envelope.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, ProtocolError> {
    message.encode_envelope()
}

/// Decodes a message of family `M`, checking version, kind and body in that order.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    let header = peek(bytes, M::FAMILY)?;
    M::decode_body(&header.1, bytes)
}

/// Reads the envelope's version and kind without decoding the body.
pub fn peek(bytes: &[u8], family: &str) -> Result<(u32, String), ProtocolError> {
    let header: Header = from_slice(bytes)
        .map_err(|error| ProtocolError::malformed(format!("{family} envelope"), error))?;
    if header.protocol != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            found: header.protocol,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok((header.protocol, header.kind))
}

/// Encodes one body in an envelope of `kind`. Used by [`Message`] implementations.
pub fn encode_envelope<T: Serialize>(kind: &str, body: &T) -> Result<Vec<u8>, ProtocolError> {
    let envelope = EnvelopeRef {
        protocol: PROTOCOL_VERSION,
        kind,
        body,
    };
    let mut bytes = Vec::with_capacity(256);
    let mut serializer = rmp_serde::Serializer::new(&mut bytes)
        .with_struct_map()
        .with_human_readable();
    envelope
        .serialize(&mut serializer)
        .map_err(|error| ProtocolError::malformed(kind, error))?;
    Ok(bytes)
}

fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
    T::deserialize(&mut deserializer)
}

/// Decodes the body of an envelope of `kind`. Used by [`Message`] implementations.
pub fn decode_envelope<T: DeserializeOwned>(
    family: &str,
    kind: &str,
    bytes: &[u8],
) -> Result<T, ProtocolError> {
    let envelope: Envelope<T> = from_slice(bytes)
        .map_err(|error| ProtocolError::malformed(format!("{family} '{kind}'"), error))?;
    Ok(envelope.body)
}

/// Declares an enum of messages sharing one channel, with its envelope codec.
///
/// Each variant wraps one body type and names its wire kind.
#[macro_export]
macro_rules! message_family {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $family:literal {
            $( $(#[$vmeta:meta])* $variant:ident($body:ty) = $kind:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::large_enum_variant)] // messages are short-lived; boxing buys nothing
        $vis enum $name {
            $( $(#[$vmeta])* $variant($body) ),+
        }

        impl $crate::codec::Message for $name {
            const FAMILY: &'static str = $family;
            const KINDS: &'static [&'static str] = &[$($kind),+];

            fn kind(&self) -> &'static str {
                match self { $( Self::$variant(_) => $kind ),+ }
            }

            fn encode_envelope(&self) -> Result<Vec<u8>, $crate::error::ProtocolError> {
                match self { $( Self::$variant(body) => $crate::codec::encode_envelope($kind, body) ),+ }
            }

            fn decode_body(kind: &str, bytes: &[u8]) -> Result<Self, $crate::error::ProtocolError> {
                match kind {
                    $( $kind => $crate::codec::decode_envelope::<$body>($family, $kind, bytes).map(Self::$variant), )+
                    other => Err($crate::error::ProtocolError::UnknownKind {
                        family: $family,
                        kind: other.chars().take(64).collect(),
                    }),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ping {
        n: u32,
    }

    message_family! {
        enum Test: "test" {
            Ping(Ping) = "ping",
        }
    }

    #[test]
    fn round_trips_with_named_fields() {
        let bytes = encode(&Test::Ping(Ping { n: 7 })).unwrap();
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"protocol": 1, "kind": "ping", "body": {"n": 7}})
        );
        assert_eq!(decode::<Test>(&bytes).unwrap(), Test::Ping(Ping { n: 7 }));
    }

    #[test]
    fn uuids_and_times_are_strings() {
        let id = uuid::Uuid::now_v7();
        let bytes = encode_envelope("x", &serde_json::json!({"id": id})).unwrap();
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(value["body"]["id"], id.to_string());
        let command =
            crate::commands::Command::Status(crate::commands::OperationRef { operation_id: id });
        let bytes = encode(&command).unwrap();
        let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(value["body"]["operation_id"], id.to_string());
        assert_eq!(decode::<crate::commands::Command>(&bytes).unwrap(), command);
    }

    #[test]
    fn names_the_problem() {
        let wrong_version = rmp_serde::to_vec_named(
            &serde_json::json!({"protocol": 9, "kind": "ping", "body": {"n": 1}}),
        )
        .unwrap();
        assert!(matches!(
            decode::<Test>(&wrong_version),
            Err(ProtocolError::UnsupportedVersion { found: 9, .. })
        ));
        let unknown = rmp_serde::to_vec_named(
            &serde_json::json!({"protocol": 1, "kind": "pong", "body": {}}),
        )
        .unwrap();
        let error = decode::<Test>(&unknown).unwrap_err();
        assert_eq!(error.to_string(), "unknown test kind 'pong'");
        let extra = rmp_serde::to_vec_named(
            &serde_json::json!({"protocol": 1, "kind": "ping", "body": {"n": 1, "x": 2}}),
        )
        .unwrap();
        assert!(
            decode::<Test>(&extra)
                .unwrap_err()
                .to_string()
                .contains("unknown field `x`")
        );
        assert_eq!(
            decode::<Test>(b"\xc1garbage").unwrap_err().code(),
            "malformed"
        );
    }
}
