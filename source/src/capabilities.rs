//! What a source adapter can do, so a plan it cannot honour is refused before any data moves.

use koan_protocol::plan::Consistency;

use crate::error::SourceError;

/// The capabilities a source adapter declares (the seed's `AdapterCapabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterCapabilities {
    /// One snapshot readable from many processes (`pg_export_snapshot()`).
    pub shared_snapshot: bool,
    /// Key ranges of one entity can be scanned concurrently by several workers.
    pub parallel_range_scans: bool,
    /// Rows stream out and in through a bulk protocol (`COPY`).
    pub bulk_copy: bool,
    /// Imports land in a staging table first, and are merged into the target
    /// in one transaction (PostgreSQL: one set-based statement; SQLite: row by
    /// row, with the same results).
    pub staged_merge: bool,
    /// Row counts are exact, not estimates.
    pub exact_counts: bool,
}

impl AdapterCapabilities {
    /// PostgreSQL: everything.
    pub const POSTGRES: Self = Self {
        shared_snapshot: true,
        parallel_range_scans: true,
        bulk_copy: true,
        staged_merge: true,
        exact_counts: true,
    };

    /// SQLite: no snapshot can be shared across processes (a read transaction
    /// belongs to one connection), and rows are read with plain statements,
    /// not a bulk protocol. Several connections read ranges concurrently.
    pub const SQLITE: Self = Self {
        shared_snapshot: false,
        parallel_range_scans: true,
        bulk_copy: false,
        staged_merge: true,
        exact_counts: true,
    };

    /// The capabilities as `(name, supported)` pairs, for diagnostics and status replies.
    pub fn entries(&self) -> [(&'static str, bool); 5] {
        [
            ("shared_snapshot", self.shared_snapshot),
            ("parallel_range_scans", self.parallel_range_scans),
            ("bulk_copy", self.bulk_copy),
            ("staged_merge", self.staged_merge),
            ("exact_counts", self.exact_counts),
        ]
    }

    /// `Err` naming the missing capability when a plan with `consistency` cannot be honoured.
    ///
    /// Every backup splits entities into key ranges read by several workers, so
    /// both modes need `parallel_range_scans`; `snapshot` also needs
    /// `shared_snapshot`, since all chunks must read one exported snapshot.
    pub fn check(&self, consistency: Consistency) -> Result<(), SourceError> {
        let unsupported = |capability| SourceError::Unsupported {
            consistency: consistency.as_str(),
            capability,
        };
        if !self.parallel_range_scans {
            return Err(unsupported("parallel_range_scans"));
        }
        if consistency == Consistency::Snapshot && !self.shared_snapshot {
            return Err(unsupported("shared_snapshot"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_honours_every_mode() {
        AdapterCapabilities::POSTGRES
            .check(Consistency::Snapshot)
            .expect("snapshot");
        AdapterCapabilities::POSTGRES
            .check(Consistency::PerChunk)
            .expect("per-chunk");
        assert!(
            AdapterCapabilities::POSTGRES
                .entries()
                .iter()
                .all(|(_, on)| *on)
        );
    }

    #[test]
    fn sqlite_refuses_snapshot_consistency_only() {
        let error = AdapterCapabilities::SQLITE
            .check(Consistency::Snapshot)
            .expect_err("no shared snapshot");
        assert_eq!(error.code(), "unsupported");
        assert!(error.to_string().contains("shared_snapshot"), "{error}");
        AdapterCapabilities::SQLITE
            .check(Consistency::PerChunk)
            .expect("per-chunk");
    }

    #[test]
    fn refusal_names_the_capability() {
        let no_snapshot = AdapterCapabilities {
            shared_snapshot: false,
            ..AdapterCapabilities::POSTGRES
        };
        let error = no_snapshot
            .check(Consistency::Snapshot)
            .expect_err("snapshot needs a shared snapshot");
        assert_eq!(error.code(), "unsupported");
        let message = error.to_string();
        assert!(message.contains("shared_snapshot"), "{message}");
        assert!(message.contains("'snapshot'"), "{message}");
        no_snapshot
            .check(Consistency::PerChunk)
            .expect("per-chunk needs no shared snapshot");

        let no_ranges = AdapterCapabilities {
            parallel_range_scans: false,
            ..AdapterCapabilities::POSTGRES
        };
        let message = no_ranges
            .check(Consistency::PerChunk)
            .expect_err("ranges are required")
            .to_string();
        assert!(message.contains("parallel_range_scans"), "{message}");
    }
}
