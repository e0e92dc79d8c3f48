//! Stopping the jobs of a paused or cancelled operation.
//!
//! [`Halts`] keeps the in-flight export and import jobs by operation id, each
//! with its own cancellation token (a child of the worker's shutdown token).
//! The worker follows `operation.*.paused` and `operation.*.cancelled` on a
//! private queue; on such an event every registered job of that operation is
//! cancelled: it stops at the next row boundary, aborts its open part or
//! rolls back its transaction, and its delivery is acked (the coordinator
//! re-publishes the work on resume). A job registered after the event gets a
//! fresh token: it will find its claim refused instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Public operation events that stop an operation's jobs.
pub const HALT_EVENTS: [&str; 2] = ["paused", "cancelled"];

/// In-flight jobs by operation.
#[derive(Debug, Clone, Default)]
pub struct Halts {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    jobs: HashMap<Uuid, HashMap<u64, CancellationToken>>,
}

impl Halts {
    /// Registers a job of `operation_id`; its token is cancelled by `shutdown`
    /// or by a halt of the operation. The job leaves the registry when the
    /// guard is dropped.
    pub fn register(&self, operation_id: Uuid, shutdown: &CancellationToken) -> HaltGuard {
        let token = shutdown.child_token();
        let mut registry = self.lock();
        registry.next_id += 1;
        let id = registry.next_id;
        registry
            .jobs
            .entry(operation_id)
            .or_default()
            .insert(id, token.clone());
        HaltGuard {
            halts: self.clone(),
            operation_id,
            id,
            token,
            shutdown: shutdown.clone(),
        }
    }

    /// Cancels every job registered for `operation_id`; returns how many.
    pub fn halt(&self, operation_id: Uuid) -> usize {
        let jobs = self.lock().jobs.remove(&operation_id).unwrap_or_default();
        for token in jobs.values() {
            token.cancel();
        }
        jobs.len()
    }

    /// Jobs registered for `operation_id`.
    pub fn running(&self, operation_id: Uuid) -> usize {
        self.lock().jobs.get(&operation_id).map_or(0, HashMap::len)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One registered job.
#[derive(Debug)]
pub struct HaltGuard {
    halts: Halts,
    operation_id: Uuid,
    id: u64,
    token: CancellationToken,
    shutdown: CancellationToken,
}

impl HaltGuard {
    /// The job's cancellation token.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// True when the operation was paused or cancelled (not the worker shut down).
    pub fn halted(&self) -> bool {
        self.token.is_cancelled() && !self.shutdown.is_cancelled()
    }
}

impl Drop for HaltGuard {
    fn drop(&mut self) {
        let mut registry = self.halts.lock();
        if let Some(jobs) = registry.jobs.get_mut(&self.operation_id) {
            jobs.remove(&self.id);
            if jobs.is_empty() {
                registry.jobs.remove(&self.operation_id);
            }
        }
    }
}

/// The operation a public event's routing key (`operation.<id>.<event>`) names.
pub fn operation_of(routing_key: &str) -> Option<Uuid> {
    let mut segments = routing_key.split('.');
    match (segments.next(), segments.next(), segments.next()) {
        (Some("operation"), Some(id), Some(event)) if HALT_EVENTS.contains(&event) => {
            Uuid::parse_str(id).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn halts_only_the_operations_jobs_and_forgets_them() {
        let shutdown = CancellationToken::new();
        let halts = Halts::default();
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let a = halts.register(first, &shutdown);
        let b = halts.register(second, &shutdown);
        assert_eq!(halts.halt(first), 1);
        assert!(a.halted() && a.token().is_cancelled());
        assert!(!b.token().is_cancelled());
        // A job registered after the halt starts with a fresh token.
        let later = halts.register(first, &shutdown);
        assert!(!later.token().is_cancelled());
        drop(later);
        assert_eq!(halts.running(first), 0);
        shutdown.cancel();
        assert!(b.token().is_cancelled() && !b.halted());
        drop(b);
        assert_eq!(halts.running(second), 0);
    }

    #[test]
    fn reads_the_operation_from_the_routing_key() {
        let id = Uuid::now_v7();
        assert_eq!(operation_of(&format!("operation.{id}.paused")), Some(id));
        assert_eq!(operation_of(&format!("operation.{id}.cancelled")), Some(id));
        assert_eq!(operation_of(&format!("operation.{id}.progress")), None);
        assert_eq!(operation_of("operation.nope.paused"), None);
    }
}
