//! Entity sources for koan-backup: where rows come from during a backup, and
//! where they go back to during a restore.
//!
//! A source checks an entity against its catalog, holds a snapshot that many
//! workers can share, cuts an entity into key ranges of equal row counts, and
//! streams the rows of one range without buffering it.
//!
//! # Layout
//! - [`capabilities`]: [`AdapterCapabilities`], what a source can do, and the
//!   check that refuses a plan it cannot honour.
//! - [`error`]: [`SourceError`], with a stable code and a retry verdict per error.
//! - [`postgres`]: the PostgreSQL source, [`PgSource`]: catalog inspection,
//!   exported snapshots ([`SnapshotHolder`]), range planning ([`RangePlan`]) and
//!   binary `COPY` streaming ([`RowStream`] of [`ExportRow`]s); and restores
//!   into it: target checks, imports ([`ImportSession`] of [`ImportLine`]s,
//!   giving an [`ImportOutcome`]) and `replace` mode's swap ([`ApplyOutcome`]).
//!
//! `design.md` beside this crate explains the subtle parts: snapshot holding,
//! range boundaries, connection hygiene, the COPY parser, and restores
//! (reconciliation per mode, row isolation, staging).

#![warn(missing_docs)]

pub mod capabilities;
pub mod error;
pub mod postgres;

pub use capabilities::AdapterCapabilities;
pub use error::SourceError;
pub use postgres::{
    ApplyOutcome, ExportRow, ImportLine, ImportOutcome, ImportSession, PgSource, RangePlan,
    RowStream, SnapshotHolder,
};
