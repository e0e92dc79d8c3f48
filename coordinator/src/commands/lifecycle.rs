//! `pause`, `resume` (by operation id or continuation token) and `cancel`.
//!
//! A continuation token is checked with the deployment's secret before
//! anything else: a modified token is `invalid_token`, a token naming an
//! operation this coordinator does not know is `unknown_operation`.

use tracing::info;
use uuid::Uuid;

use koan_protocol::commands::{OperationRef, ResumeOperation};
use koan_protocol::token;

use crate::error::CoordinatorError;
use crate::store::{Lifecycle, StateStore};

use super::{Answer, Commands, accepted, refuse};

impl<S: StateStore> Commands<S> {
    pub(super) async fn pause(&self, command: OperationRef) -> Result<Answer, CoordinatorError> {
        let outcome = self.store.pause(command.operation_id).await?;
        Ok(answer("pause", command.operation_id, outcome))
    }

    pub(super) async fn resume(
        &self,
        command: ResumeOperation,
    ) -> Result<Answer, CoordinatorError> {
        let operation_id = match (command.operation_id, command.token.as_deref()) {
            (None, None) => {
                return Ok(refuse(
                    "invalid_command",
                    "resume needs `operation_id` or `token`",
                ));
            }
            (operation_id_opt, Some(token)) => {
                let payload = match token::verify(token, self.store.token_secret()) {
                    Ok(payload) => payload,
                    Err(error) => return Ok(refuse("invalid_token", error.to_string())),
                };
                if let Some(operation_id) = operation_id_opt
                    && operation_id != payload.operation_id
                {
                    return Ok(refuse(
                        "invalid_command",
                        format!(
                            "the token names operation {}, not {operation_id}",
                            payload.operation_id
                        ),
                    ));
                }
                payload.operation_id
            }
            (Some(operation_id), None) => operation_id,
        };
        let outcome = self.store.resume(operation_id).await?;
        Ok(answer("resume", operation_id, outcome))
    }

    pub(super) async fn cancel(&self, command: OperationRef) -> Result<Answer, CoordinatorError> {
        let outcome = self.store.cancel(command.operation_id).await?;
        Ok(answer("cancel", command.operation_id, outcome))
    }
}

fn answer(command: &'static str, operation_id: Uuid, outcome: Lifecycle) -> Answer {
    match outcome {
        Lifecycle::Done { existing } => {
            info!(%operation_id, command, existing, "lifecycle command accepted");
            accepted(operation_id, existing, Vec::new())
        }
        Lifecycle::Refused { code, error } => refuse(code, error),
    }
}
