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
//! - [`source`]: [`Source`], either backend behind [`PgSource`]'s methods,
//!   chosen by the URL's scheme, with [`SourceRowStream`] and
//!   [`SourceImportSession`].
//! - [`postgres`]: the PostgreSQL source, [`PgSource`]: catalog inspection,
//!   exported snapshots ([`SnapshotHolder`]), range planning ([`RangePlan`]) and
//!   binary `COPY` streaming ([`RowStream`] of [`ExportRow`]s); and restores
//!   into it: target checks, imports ([`ImportSession`] of [`ImportLine`]s,
//!   giving an [`ImportOutcome`]) and `replace` mode's swap ([`ApplyOutcome`]).
//! - [`sqlite`]: the SQLite source, [`SqliteSource`]: the same operations on a
//!   database file, without shared snapshots ([`SqliteRowStream`],
//!   [`SqliteImportSession`]).
//! - Shared by both: [`RangePlan`] and its helpers, the row types
//!   ([`ExportRow`], [`ImportLine`], [`ImportOutcome`], [`ApplyOutcome`]), and
//!   `replace` mode's staging-table names.
//!
//! `design.md` beside this crate explains the subtle parts: snapshot holding,
//! range boundaries, connection hygiene, the COPY parser, restores
//! (reconciliation per mode, row isolation, staging), and what SQLite can and
//! cannot do.

#![warn(missing_docs)]

pub mod capabilities;
pub mod error;
pub mod postgres;
mod ranges;
mod rows;
pub mod source;
pub mod sqlite;
mod staging;

pub use capabilities::AdapterCapabilities;
pub use error::SourceError;
pub use postgres::{ImportSession, PgSource, RowStream, SnapshotHolder};
pub use ranges::{MAX_CHUNK_BYTES, RangePlan, ranges_from_boundaries, rows_per_chunk};
pub use rows::{ApplyOutcome, ExportRow, ImportLine, ImportOutcome, StagingForm};
pub use source::{Backend, Source, SourceImportSession, SourceRowStream};
pub use sqlite::{SqliteImportSession, SqliteRowStream, SqliteSource};
