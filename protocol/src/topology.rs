//! AMQP topology: exchange, queue and routing-key names, and header names.
//!
//! ```text
//! koan.commands  direct, durable   routing key = command kind → queue koan.commands (quorum)
//!                                  unroutable commands → alternate exchange koan.dead
//! koan.jobs      direct, durable   routing key = pool → queue koan.jobs.<pool> (quorum, delivery limit)
//! koan.events    topic, durable    operation.<id>.<event>  public events for clients
//!                                  worker.<id>.<event>     worker reports → queue koan.coordinator (quorum)
//! koan.dead      fanout, durable   → queue koan.dead: poison and over-limit messages, with a reason header
//!                                  → queue koan.coordinator.dead: the coordinators' copy, to fail the
//!                                    operation of a job dead-lettered after its delivery limit
//! ```

use uuid::Uuid;

/// Exchange receiving client commands.
pub const COMMANDS_EXCHANGE: &str = "koan.commands";
/// Queue the coordinators consume commands from.
pub const COMMANDS_QUEUE: &str = "koan.commands";
/// Exchange receiving jobs; routing key = pool.
pub const JOBS_EXCHANGE: &str = "koan.jobs";
/// Topic exchange for public operation events and worker reports.
pub const EVENTS_EXCHANGE: &str = "koan.events";
/// Queue the coordinators consume worker reports from.
pub const COORDINATOR_QUEUE: &str = "koan.coordinator";
/// Dead-letter exchange.
pub const DEAD_EXCHANGE: &str = "koan.dead";
/// Dead-letter queue.
pub const DEAD_QUEUE: &str = "koan.dead";
/// The coordinators' copy of every dead-lettered message (jobs among them fail their operation).
pub const COORDINATOR_DEAD_QUEUE: &str = "koan.coordinator.dead";

/// Header naming why a message was dead-lettered.
pub const DEAD_REASON_HEADER: &str = "x-koan-dead-reason";
/// Header naming the queue a dead-lettered message came from.
pub const DEAD_SOURCE_HEADER: &str = "x-koan-dead-source";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// W3C trace state header.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Deliveries of one job before it is dead-lettered.
pub const JOB_DELIVERY_LIMIT: u32 = 5;
/// Deliveries of one command or worker report before it is dead-lettered.
pub const CONTROL_DELIVERY_LIMIT: u32 = 10;

/// Largest command accepted (an inline plan fits comfortably).
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;
/// Largest job or worker report accepted (a finalize job carries the manifest).
pub const MAX_JOB_BYTES: usize = 256 * 1024 * 1024;

/// Routing keys the commands queue is bound with.
pub const COMMAND_ROUTING_KEYS: &[&str] = &[
    "start_backup",
    "start_restore",
    "pause",
    "resume",
    "cancel",
    "verify",
    "status",
    "list",
    "diagnostics",
    "replay",
];

/// Queue of a worker pool.
pub fn pool_queue(pool: &str) -> String {
    format!("koan.jobs.{pool}")
}

/// Routing key of a public operation event (`progress`, `completed`, ...).
pub fn operation_event_key(operation_id: Uuid, event: &str) -> String {
    format!("operation.{operation_id}.{event}")
}

/// Binding key that follows every public event of one operation.
pub fn operation_follow_key(operation_id: Uuid) -> String {
    format!("operation.{operation_id}.#")
}

/// Routing key of a worker report.
pub fn worker_event_key(operation_id: Uuid, event: &str) -> String {
    format!("worker.{operation_id}.{event}")
}

/// Binding key of the coordinator queue.
pub const WORKER_EVENTS_BINDING: &str = "worker.#";
