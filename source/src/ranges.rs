//! Range plans, whatever the backend: how many rows a chunk holds, and the
//! contiguous key ranges cut at the chosen boundary keys.
//!
//! Each backend picks the boundaries itself, as the keys at row numbers
//! `N+1, 2N+1, ...` in its own key order, so every chunk holds exactly `N`
//! rows (the last one fewer) whatever the key distribution.

use koan_protocol::archive::KeyRange;

/// Bytes of document one chunk should hold at most, whatever `chunk_rows` says.
pub const MAX_CHUNK_BYTES: u64 = 256 * 1024 * 1024;

/// The key ranges of one entity, and the counts they were chosen from.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePlan {
    /// Rows of the entity (within its scope) at planning time.
    pub rows_total: u64,
    /// Rows per chunk the ranges were cut for.
    pub rows_per_chunk: u64,
    /// Contiguous ranges in key order, covering the whole key space:
    /// `[None, b1), [b1, b2), ..., [bk, None)`.
    pub ranges: Vec<KeyRange>,
}

/// Rows per chunk: the entity's target, lowered so a chunk stays near [`MAX_CHUNK_BYTES`].
pub fn rows_per_chunk(chunk_rows: u64, average_row_bytes: f64) -> u64 {
    let by_size = if average_row_bytes.is_finite() && average_row_bytes >= 1.0 {
        // Truncation is intended: a whole number of rows.
        ((MAX_CHUNK_BYTES as f64) / average_row_bytes) as u64
    } else {
        u64::MAX
    };
    chunk_rows.min(by_size.max(1)).max(1)
}

/// Turns sorted boundary keys into contiguous ranges covering everything.
pub fn ranges_from_boundaries(boundaries: Vec<String>) -> Vec<KeyRange> {
    let mut ranges = Vec::with_capacity(boundaries.len() + 1);
    let mut lo = None;
    for boundary in boundaries {
        ranges.push(KeyRange {
            lo: lo.take(),
            hi: Some(boundary.clone()),
        });
        lo = Some(boundary);
    }
    ranges.push(KeyRange { lo, hi: None });
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_respects_target_and_byte_budget() {
        assert_eq!(rows_per_chunk(100_000, 0.0), 100_000);
        assert_eq!(rows_per_chunk(100_000, 100.0), 100_000);
        assert_eq!(rows_per_chunk(100_000, 1024.0 * 1024.0), 256);
        assert_eq!(rows_per_chunk(100_000, 1024.0 * 1024.0 * 1024.0), 1);
        assert_eq!(rows_per_chunk(0, 10.0), 1);
        assert_eq!(rows_per_chunk(10, f64::NAN), 10);
    }

    #[test]
    fn boundaries_become_contiguous_ranges() {
        assert_eq!(ranges_from_boundaries(vec![]), vec![KeyRange::default()]);
        let ranges = ranges_from_boundaries(vec!["b".into(), "m".into()]);
        let range = |lo: Option<&str>, hi: Option<&str>| KeyRange {
            lo: lo.map(str::to_string),
            hi: hi.map(str::to_string),
        };
        assert_eq!(
            ranges,
            vec![
                range(None, Some("b")),
                range(Some("b"), Some("m")),
                range(Some("m"), None)
            ]
        );
    }
}
