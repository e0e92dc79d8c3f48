//! `replace` mode's staging tables, whatever the backend: their names, and the
//! check that only such a table is ever dropped or applied.

use koan_protocol::ProtocolError;
use koan_protocol::names::check_ident;

use crate::error::SourceError;

/// Every staging table's name starts with this; nothing else is ever dropped.
pub(crate) const STAGING_PREFIX: &str = "koan_stage_";

/// `koan_stage_<first 12 hex of the operation>_<entity>`, at most 63 bytes.
/// An entity name that had to be altered (characters outside `[A-Za-z0-9_]`,
/// or too long) gets a hash of the original, so two entities never share one.
pub(crate) fn staging_table_name(entity: &str, operation_id: uuid::Uuid) -> String {
    let operation = operation_id.simple().to_string();
    let mut name = format!("{STAGING_PREFIX}{}_", &operation[..12]);
    let sanitized: String = entity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let room = 63 - name.len();
    if sanitized == entity && sanitized.len() <= room {
        name.push_str(&sanitized);
    } else {
        // FNV-1a: stable across builds and platforms.
        let hash = entity.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        });
        let keep: String = sanitized.chars().take(room - 9).collect();
        name.push_str(&format!("{keep}_{hash:08x}"));
    }
    name
}

/// Refuses any name that is not a koan staging table: only those are ever dropped.
pub(crate) fn check_staging_name(table: &str) -> Result<(), SourceError> {
    check_ident("staging_table", table)?;
    if !table.starts_with(STAGING_PREFIX) {
        return Err(SourceError::Invalid(ProtocolError::InvalidName {
            field: "staging_table".into(),
            value: table.escape_default().collect(),
            reason: "not a koan staging table (koan_stage_...)",
        }));
    }
    Ok(())
}
