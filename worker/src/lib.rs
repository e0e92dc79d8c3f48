//! The koan-backup worker: the data plane. It consumes jobs from its pools'
//! queues, reads entities from PostgreSQL and writes archives to storage
//! (backups), reads archives back into PostgreSQL (restores) and checks them
//! (verify), keeping no state of its own between jobs, so any number can run
//! side by side.
//!
//! # Layout
//! - [`service`]: [`run`]: connects to RabbitMQ, declares the topology,
//!   consumes the pool queues with a job slot taken before each delivery,
//!   reconnects with backoff, shuts down in order.
//! - `delivery`: one delivery: decode (dead-letter what is not a job), run, ack or requeue.
//! - [`jobs`]: the jobs, each returning an [`Outcome`](jobs::Outcome):
//!   - [`jobs::plan`]: inspect the entity, take the snapshot, choose ranges;
//!     hold the snapshot in the background until the operation ends.
//!   - [`jobs::export`]: claim a chunk, stream it into parts, report each part.
//!   - [`jobs::finalize`]: check the parts, remove leftovers, write the manifest last.
//!   - [`jobs::plan_restore`]: read the manifest, prepare the target, list the parts to import.
//!   - [`jobs::import`]: one part into the target in one transaction, committed only if it matches the manifest.
//!   - [`jobs::apply`]: `replace` mode: swap staged rows into the target.
//!   - [`jobs::replay`]: write again the rows a restore could not write.
//!   - [`jobs::discard`]: remove what a cancelled backup wrote.
//!   - [`jobs::verify`]: read every part and check it against the manifest.
//!   - [`jobs::target`]: [`RestoreStore`](jobs::RestoreStore), where restores write (PostgreSQL).
//! - [`chunk_writer`]: [`PartWriter`]: JSON lines → zstd → blake3 → multipart upload.
//! - [`part_reader`]: [`PartReader`]: storage → blake3 + size → zstd → lines, the way back.
//! - [`archive_line`]: parsing an archive line; the diagnostic of one that does not parse.
//! - [`halts`]: [`Halts`](halts::Halts), in-flight jobs by operation, stopped when it is paused or cancelled.
//! - [`events`]: the [`Events`] sink jobs report to (RabbitMQ with confirms, or memory).
//! - [`job_span`]: [`JobSpan`](job_span::JobSpan), the span of one job: child of
//!   the coordinator span that queued it, filled in from the job's reports.
//! - [`metrics`]: [`WorkerMetrics`](metrics::WorkerMetrics), rows and bytes
//!   exported and imported, chunk and job durations, jobs in flight, retries,
//!   dead letters; counted from confirmed reports by [`MeteredEvents`](metrics::MeteredEvents).
//! - [`storage`]: archive storage over `object_store` (local directory).
//! - [`config`]: [`Config`], defaults, `KOAN_*` overrides, validation.
//! - [`error`]: [`WorkerError`] with codes and retry verdicts.
//!
//! The rules the worker keeps (ack after durable, run ids as fencing tokens,
//! part sizes versus the consumer timeout, snapshot holding, one transaction
//! per imported part) are in `design.md`.

#![warn(missing_docs)]

pub mod archive_line;
pub mod chunk_writer;
pub mod config;
mod delivery;
pub mod error;
pub mod events;
pub mod halts;
pub mod job_span;
pub mod jobs;
pub mod metrics;
pub mod part_reader;
pub mod service;
pub mod storage;

pub use chunk_writer::PartWriter;
pub use config::Config;
pub use error::WorkerError;
pub use events::{BrokerEvents, Events, MemoryEvents};
pub use part_reader::PartReader;
pub use service::run;
pub use storage::Storage;
