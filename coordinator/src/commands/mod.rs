//! Client commands, each answered on `reply_to`: `start_backup`, `status` and
//! `list` here; `pause`, `resume` and `cancel` in `lifecycle`; `start_restore`, `verify`, `diagnostics` and `replay` in
//! [`restores`].
//!
//! A command that cannot be decoded (bad msgpack, unknown version, kind or
//! field, oversize) is answered `rejected` and dead-lettered; a valid command
//! the coordinator refuses (unknown plan or backup, invalid plan, missing
//! table, cross-scope restore) is answered `rejected` and acked. An operation
//! is recorded, with its first jobs in the outbox, before `accepted` is sent.
//!
//! With a source configured, [`SourceCatalog`] checks each plan against the
//! source's catalog first, so a missing table or column, or a mode the source
//! cannot honour, is refused before any job is published.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{Instrument, Span, info, warn};
use uuid::Uuid;

use koan_protocol::commands::{
    Accepted, Command, ListOperations, OperationRef, Operations, Rejected, Reply, StartBackup,
};
use koan_protocol::topology::MAX_COMMAND_BYTES;
use koan_protocol::{ProtocolError, decode};
use koan_transport::{Incoming, Outgoing};

use crate::broker::{Decision, Handler};
use crate::error::CoordinatorError;
use crate::plans::PlanRegistry;
use crate::store::{NewBackup, StateStore};

mod catalog;
mod lifecycle;
pub mod restores;

pub use catalog::SourceCatalog;

/// Operations listed when `list` names no limit.
pub const DEFAULT_LIST_LIMIT: u32 = 50;
/// Most operations one `list` returns.
pub const MAX_LIST_LIMIT: u32 = 1_000;
/// Most labels one operation may carry.
pub const MAX_LABELS: usize = 64;

/// What the coordinator answers to one command, and whether the command is poison.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The reply (sent when the command asked for one).
    pub reply: Reply,
    /// Why the command goes to the dead-letter queue, when it does.
    pub dead_letter: Option<String>,
    /// Whether the state store changed (the outbox has something new).
    pub changed: bool,
}

impl Answer {
    fn reply(reply: Reply) -> Self {
        Self {
            reply,
            dead_letter: None,
            changed: false,
        }
    }

    fn poison(error: &ProtocolError) -> Self {
        Self {
            reply: rejected(error.code(), error.to_string()),
            dead_letter: Some(format!("{}: {error}", error.code())),
            changed: false,
        }
    }
}

fn rejected(code: &str, error: impl Into<String>) -> Reply {
    Reply::Rejected(Rejected {
        code: code.to_string(),
        error: error.into(),
    })
}

/// Handles client commands against a state store.
#[derive(Debug)]
pub struct Commands<S> {
    store: Arc<S>,
    plans: Arc<PlanRegistry>,
    catalog: Option<SourceCatalog>,
}

impl<S: StateStore> Commands<S> {
    /// A handler over `store`, with registered `plans` and an optional source `catalog`.
    pub fn new(store: Arc<S>, plans: Arc<PlanRegistry>, catalog: Option<SourceCatalog>) -> Self {
        Self {
            store,
            plans,
            catalog,
        }
    }

    /// Answers one command body; `message_id` is the AMQP `message_id` of the
    /// delivery (a redelivered `start_backup` finds its operation by it).
    /// Errors are the state store's: retry the command later.
    pub async fn answer(
        &self,
        payload: &[u8],
        message_id: Option<&str>,
    ) -> Result<Answer, CoordinatorError> {
        if payload.len() > MAX_COMMAND_BYTES {
            return Ok(Answer::poison(&ProtocolError::TooLarge {
                size: payload.len(),
                limit: MAX_COMMAND_BYTES,
            }));
        }
        let command = match decode::<Command>(payload) {
            Ok(command) => command,
            Err(error) => return Ok(Answer::poison(&error)),
        };
        match command {
            Command::StartBackup(start) => self.start_backup(start, message_id).await,
            Command::Status(OperationRef { operation_id }) => {
                let reply = match self.store.report(operation_id).await? {
                    Some(report) => Reply::Status(report),
                    None => rejected("unknown_operation", format!("no operation {operation_id}")),
                };
                Ok(Answer::reply(reply))
            }
            Command::List(ListOperations { limit }) => {
                let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT);
                let operations = self.store.list_reports(limit).await?;
                Ok(Answer::reply(Reply::Operations(Operations { operations })))
            }
            Command::StartRestore(start) => self.start_restore(start, message_id).await,
            Command::Verify(verify) => self.verify(verify, message_id).await,
            Command::Diagnostics(query) => self.diagnostics(query).await,
            Command::Replay(replay) => self.replay(replay, message_id).await,
            Command::Pause(pause) => self.pause(pause).await,
            Command::Resume(resume) => self.resume(resume).await,
            Command::Cancel(cancel) => self.cancel(cancel).await,
        }
    }

    async fn start_backup(
        &self,
        start: StartBackup,
        message_id: Option<&str>,
    ) -> Result<Answer, CoordinatorError> {
        if start.plan_id.is_some() == start.plan.is_some() {
            return Ok(refuse(
                "invalid_command",
                "start_backup needs exactly one of `plan_id` and `plan`",
            ));
        }
        if let Some(existing) = self
            .store
            .find_submission(start.operation_id, message_id)
            .await?
        {
            info!(operation_id = %existing, "backup submitted again");
            return Ok(accepted(existing, true, Vec::new()));
        }
        let plan = match (start.plan_id, start.plan) {
            (_, Some(plan)) => plan,
            (Some(plan_id), None) => match self.plans.get(&plan_id) {
                Some(plan) => plan.clone(),
                None => {
                    let error = format!("no plan is registered as '{}'", plan_id.escape_default());
                    return Ok(refuse("unknown_plan", error));
                }
            },
            (None, None) => return Ok(refuse("invalid_command", "start_backup names no plan")),
        };
        if let Err(error) = plan.validate() {
            return Ok(refuse(error.code(), error.to_string()));
        }
        if let Err(error) = check_labels(&start.labels) {
            return Ok(refuse("invalid_labels", error));
        }
        if let Some(catalog) = &self.catalog {
            let checking = tracing::info_span!("check_catalog", plan = %plan.plan_id,
                entities = plan.entities.len());
            match catalog.check(&plan).instrument(checking).await {
                Ok(()) => {}
                Err(error @ CoordinatorError::Source { .. }) => {
                    return Ok(refuse(error.code(), error.to_string()));
                }
                Err(other) => return Err(other),
            }
        }
        let operation_id = start.operation_id.unwrap_or_else(Uuid::now_v7);
        let description = start.description.or_else(|| plan.description.clone());
        if let Err(error) = check_description(description.as_deref()) {
            return Ok(refuse("invalid_command", error));
        }
        let plan_id = plan.plan_id.clone();
        let submitted = self
            .store
            .submit_backup(&NewBackup {
                operation_id,
                command_id: message_id.map(str::to_string),
                plan,
                labels: start.labels,
                description,
                trace: koan_telemetry::current(),
            })
            .instrument(record_operation_span(operation_id))
            .await?;
        info!(operation_id = %submitted.operation_id, %plan_id, existing = submitted.existing, "backup accepted");
        Ok(accepted(
            submitted.operation_id,
            submitted.existing,
            Vec::new(),
        ))
    }
}

/// The span of the state store transaction that records operation
/// `operation_id` and queues its first jobs.
fn record_operation_span(operation_id: Uuid) -> tracing::Span {
    tracing::info_span!("record_operation", %operation_id)
}

/// `accepted`; a new operation (not `existing`) changed the state store.
fn accepted(operation_id: Uuid, existing: bool, warnings: Vec<String>) -> Answer {
    Answer {
        reply: Reply::Accepted(Accepted {
            operation_id,
            existing,
            warnings,
        }),
        dead_letter: None,
        changed: !existing,
    }
}

fn check_description(description: Option<&str>) -> Result<(), String> {
    match description {
        Some(text) if text.len() > 4096 => Err("description longer than 4096 bytes".into()),
        _ => Ok(()),
    }
}

fn refuse(code: &str, error: impl Into<String>) -> Answer {
    let error = error.into();
    warn!(code, error = %error, "command rejected");
    Answer::reply(rejected(code, error))
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels, got {}", labels.len()));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > 128 {
            return Err(format!(
                "label key '{}' must be 1 to 128 bytes",
                key.escape_default()
            ));
        }
        if value.len() > 1024 {
            return Err(format!(
                "label '{}' is longer than 1024 bytes",
                key.escape_default()
            ));
        }
    }
    Ok(())
}

/// The outcome of a command on its span: the operation accepted, or the
/// rejection as the span's error.
fn record_answer(span: &Span, reply: &Reply) {
    match reply {
        Reply::Accepted(accepted) => {
            span.record(
                "operation_id",
                tracing::field::display(accepted.operation_id),
            );
            span.record(
                "outcome",
                if accepted.existing {
                    "accepted again"
                } else {
                    "accepted"
                },
            );
        }
        Reply::Rejected(rejected) => {
            span.record("outcome", "rejected");
            koan_telemetry::record_failure(span, &rejected.code, &rejected.error);
        }
        _ => {
            span.record("outcome", "answered");
        }
    }
}

impl<S: StateStore> Handler for Commands<S> {
    fn span(&self, incoming: &Incoming) -> Span {
        crate::spans::command_span(incoming)
    }

    async fn handle(&self, incoming: &Incoming) -> Result<Decision, CoordinatorError> {
        let answer = match self
            .answer(&incoming.payload, incoming.message_id.as_deref())
            .await
        {
            Ok(answer) => answer,
            Err(error) if error.is_retryable() => return Err(error),
            // The command cannot be handled at all: say so, keep it for inspection.
            Err(error) => Answer {
                reply: rejected(error.code(), error.to_string()),
                dead_letter: Some(format!("{}: {error}", error.code())),
                changed: false,
            },
        };
        if let Some(reason) = &answer.dead_letter {
            warn!(queue = %incoming.queue, reason = %reason, "undecodable command dead-lettered");
        }
        record_answer(&Span::current(), &answer.reply);
        Ok(Decision {
            reply: Some(Outgoing::encode("", "", &answer.reply)?),
            dead_letter: answer.dead_letter,
            changed: answer.changed,
        })
    }
}
