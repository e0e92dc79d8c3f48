//! koan-coordinator: the control plane of koan-backup.
//!
//! Accepts commands, records every operation (backups, restores, replays of
//! a restore's failed rows, verifies), entity, chunk, part, restore unit and
//! restore diagnostic in its state store, publishes jobs to worker pools,
//! applies worker reports idempotently and publishes progress with
//! continuation tokens. It never
//! reads tenant rows and never touches archive storage: everything that
//! touches data is a job. `design.md` beside this crate explains the subtle
//! parts (idempotence, fencing, the outbox, percent, tokens).
//!
//! # Layout
//! - [`service`]: [`run`], the service: broker sessions with reconnection,
//!   consumers, outbox drainer, lease keeping, graceful shutdown.
//! - [`config`]: [`Config`], defaults, `KOAN_*` overrides, validation naming the field.
//! - [`error`]: [`CoordinatorError`], with a stable code and a retry decision.
//! - [`plans`]: [`PlanRegistry`], plans loaded from `*.toml` files.
//! - [`commands`]: [`Commands`], `start_backup`, `status` and `list`, answered
//!   on `reply_to`; [`SourceCatalog`] checks plans against the source's catalog;
//!   [`commands::restores`]: `start_restore`, `verify`, `diagnostics`, `replay`.
//! - [`reports`]: [`Reports`], worker reports and chunk claims applied to the state store.
//! - [`dead_letters`]: [`DeadLetters`], jobs dead-lettered after their delivery
//!   limit fail the unit they stood for (and so their operation).
//! - [`broker`]: queues consumed in order and acked after commit and reply;
//!   the outbox drainer publishing queued jobs and events with confirms.
//! - [`metrics`]: the coordinator's metrics (pool backlogs, operations by
//!   state, durations and figures of ended operations, dead letters) and its
//!   `/metrics` endpoint.
//! - [`progress`]: percent, ETA, continuation token and the progress report (pure).
//! - [`spans`]: the span each command, report and dead letter is handled in,
//!   child of the span that published it (one backup, one trace: `design.md`).
//! - [`store`]: the backend-neutral [`StateStore`] trait, the rules every
//!   backend shares (backups in `rules`, restores, replays and verifies in
//!   `restore_rules`), [`PgStateStore`] (PostgreSQL, migrations in `.sql` files)
//!   and [`SqliteStateStore`] (one SQLite file, for the embedded single-node mode).

#![warn(missing_docs)]

pub mod broker;
pub mod commands;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod metrics;
pub mod plans;
pub mod progress;
pub mod reports;
pub mod service;
pub mod spans;
pub mod store;

pub use commands::{Commands, SourceCatalog};
pub use config::Config;
pub use dead_letters::DeadLetters;
pub use error::CoordinatorError;
pub use plans::PlanRegistry;
pub use reports::Reports;
pub use service::{run, run_with_store};
pub use store::{PgStateStore, Policy, SqliteStateStore, StateStore};
