//! Integration tests of the SQLite source, on database files of their own in
//! the temporary directory (removed when each test ends), and of [`Source`]
//! over both backends: its PostgreSQL half runs against 127.0.0.1:5432 (trust
//! auth, user `postgres`; override with `KOAN_TEST_PG_BASE`), in a database of
//! its own, dropped when the test ends.

#[path = "sqlite/support.rs"]
mod support;

#[allow(dead_code)]
#[path = "postgres/support.rs"]
mod pg_support;

#[path = "sqlite/catalog.rs"]
mod catalog;
#[path = "sqlite/export.rs"]
mod export;
#[path = "sqlite/import.rs"]
mod import;
#[path = "sqlite/parity.rs"]
mod parity;
#[path = "sqlite/ranges.rs"]
mod ranges;
#[path = "sqlite/restore.rs"]
mod restore;
