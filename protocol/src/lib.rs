//! The koan-backup wire contract, shared by every component and documented in
//! `PROTOCOL.md` for clients in other languages.
//!
//! # Layout
//! - [`codec`]: the msgpack envelope (`protocol`, `kind`, `body`) every message travels in.
//! - [`topology`]: exchange, queue and routing-key names, AMQP header names.
//! - [`commands`]: what clients send to the coordinator and what it replies.
//! - [`jobs`]: what the coordinator asks workers to do.
//! - [`events`]: what workers report back, and the public operation events.
//! - [`progress`]: the progress report carried by events and status replies.
//! - [`plan`]: backup plans (TOML files or inline) and their validation.
//! - [`names`]: validated names and SQL quoting; nothing unvalidated reaches SQL or storage.
//! - [`archive`]: the archive layout (format version 1) and the manifest schema.
//! - [`token`]: tamper-evident continuation tokens.
//! - [`trace`]: the W3C trace context carried in message headers.
//!
//! Nothing in this crate performs I/O.

pub mod archive;
pub mod codec;
pub mod commands;
pub mod error;
pub mod events;
pub mod jobs;
pub mod names;
pub mod plan;
pub mod progress;
pub mod token;
pub mod topology;
pub mod trace;

pub use codec::{Message, PROTOCOL_VERSION, decode, encode};
pub use error::ProtocolError;
