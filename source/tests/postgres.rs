//! Integration tests against a real PostgreSQL (127.0.0.1:5432, trust auth,
//! superuser `postgres`; override with `KOAN_TEST_PG_BASE=postgresql://user@host:port`).
//!
//! Every test creates its own database `koan_src_<uuid>` and drops it (`WITH
//! (FORCE)`) when done, even on panic, so tests run in parallel and leave nothing.
//! If PostgreSQL is not reachable every test fails, saying how to start it.

#[path = "postgres/support.rs"]
mod support;

#[path = "postgres/catalog.rs"]
mod catalog;
#[path = "postgres/export.rs"]
mod export;
#[path = "postgres/import.rs"]
mod import;
#[path = "postgres/load.rs"]
mod load;
#[path = "postgres/ranges.rs"]
mod ranges;
#[path = "postgres/restore.rs"]
mod restore;
#[path = "postgres/snapshot.rs"]
mod snapshot;
