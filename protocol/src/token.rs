//! Continuation tokens: opaque to clients, tamper-evident, stable across restarts.
//!
//! A token is `base64url(payload) "." base64url(mac)` where the payload is the
//! msgpack of [`TokenPayload`] and the mac is blake3 keyed with the
//! deployment's secret (kept in the coordinator's state store, so every
//! coordinator instance shares it and it survives restarts).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ProtocolError;

/// What a continuation token names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPayload {
    /// The operation.
    pub operation_id: Uuid,
    /// Parts durable when the token was issued.
    pub parts_done: u64,
    /// Rows durable when the token was issued.
    pub rows_done: u64,
}

/// Signs `payload` with `key`.
pub fn sign(payload: &TokenPayload, key: &[u8; 32]) -> String {
    let body = rmp_serde::to_vec_named(payload).unwrap_or_default();
    let mac = blake3::keyed_hash(key, &body);
    format!("{}.{}", B64.encode(&body), B64.encode(mac.as_bytes()))
}

/// Checks and decodes a token signed with `key`.
pub fn verify(token: &str, key: &[u8; 32]) -> Result<TokenPayload, ProtocolError> {
    let (body, mac) = token
        .trim()
        .split_once('.')
        .ok_or(ProtocolError::InvalidToken("not a koan-backup token"))?;
    let body = B64
        .decode(body)
        .map_err(|_| ProtocolError::InvalidToken("not base64url"))?;
    let mac = B64
        .decode(mac)
        .map_err(|_| ProtocolError::InvalidToken("not base64url"))?;
    let mac: [u8; 32] = mac
        .try_into()
        .map_err(|_| ProtocolError::InvalidToken("truncated signature"))?;
    if blake3::keyed_hash(key, &body) != blake3::Hash::from(mac) {
        return Err(ProtocolError::InvalidToken(
            "signature does not match (modified, or issued by another deployment)",
        ));
    }
    rmp_serde::from_slice(&body).map_err(|_| ProtocolError::InvalidToken("unreadable payload"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_tampering() {
        let key = [7u8; 32];
        let payload = TokenPayload {
            operation_id: Uuid::now_v7(),
            parts_done: 12,
            rows_done: 3400,
        };
        let token = sign(&payload, &key);
        assert_eq!(verify(&token, &key).unwrap(), payload);
        let mut bytes = token.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(verify(&tampered, &key).is_err());
        assert!(verify(&token, &[8u8; 32]).is_err());
        assert!(verify("garbage", &key).is_err());
    }
}
