//! The command-line client: submits commands over AMQP and reads replies.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use koan_protocol::commands::{
    Command, Diagnostics, DiagnosticsQuery, ListOperations, OperationRef, ReplayRows, Reply,
    ResumeOperation, StartBackup, StartRestore, VerifyBackup,
};
use koan_protocol::progress::ProgressReport;
use koan_protocol::topology::{COMMANDS_EXCHANGE, EVENTS_EXCHANGE, operation_follow_key};
use koan_transport::{Broker, Outgoing, Subscription, rpc, topology};
use tracing::Instrument;
use uuid::Uuid;

/// How long the client waits for the coordinator to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to RabbitMQ used to talk to the coordinator.
#[derive(Debug)]
pub struct Client {
    broker: Broker,
}

/// What the coordinator answered to a submission.
#[derive(Debug)]
pub struct Submitted {
    /// The operation started (or found, for a repeated id).
    pub operation_id: Uuid,
    /// True when the operation already existed.
    pub existing: bool,
    /// What the coordinator wants the user told.
    pub warnings: Vec<String>,
    /// The trace the submission started (traces exported only).
    pub trace_id: Option<String>,
}

impl Client {
    /// Connects and declares the coordinator's queues, so a command submitted
    /// before the coordinator starts waits for it instead of being lost.
    pub async fn connect(amqp_url: &str) -> Result<Self> {
        let broker = Broker::connect(amqp_url, "koan-backup cli").await?;
        topology::declare_coordinator(&broker)
            .await
            .context("declaring the command topology")?;
        Ok(Self { broker })
    }

    /// Follows every public event of `operation_id` (bind before submitting).
    pub async fn follow(&self, operation_id: Uuid) -> Result<Subscription> {
        Ok(self
            .broker
            .follow(EVENTS_EXCHANGE, &[operation_follow_key(operation_id)])
            .await?)
    }

    async fn request(&self, command: &Command) -> Result<Reply> {
        let outgoing = Outgoing::encode(COMMANDS_EXCHANGE, command_routing_key(command), command)?;
        let reply = rpc::request(&self.broker, outgoing, REPLY_TIMEOUT)
            .await
            .context("no answer from the coordinator (is `koan-backup coordinator` running?)")?;
        Ok(koan_protocol::decode::<Reply>(&reply.payload)?)
    }

    /// Submits a command that starts an operation, in a `submit` span: the
    /// root of the operation's trace (the command carries its context). A
    /// rejection is an error carrying the coordinator's reason, and the span's.
    async fn start(&self, command: Command) -> Result<Submitted> {
        let kind = command_routing_key(&command);
        let span = tracing::info_span!(
            "submit",
            otel.kind = "producer",
            command = kind,
            operation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        koan_telemetry::adopt(&span, None);
        let trace_id = koan_telemetry::trace_id(&span);
        let reply = self.request(&command).instrument(span.clone()).await;
        let failure = match reply {
            Ok(Reply::Accepted(accepted)) => {
                span.record(
                    "operation_id",
                    tracing::field::display(accepted.operation_id),
                );
                return Ok(Submitted {
                    operation_id: accepted.operation_id,
                    existing: accepted.existing,
                    warnings: accepted.warnings,
                    trace_id,
                });
            }
            Ok(Reply::Rejected(rejected)) => {
                koan_telemetry::record_failure(&span, &rejected.code, &rejected.error);
                anyhow::anyhow!("rejected ({}): {}", rejected.code, rejected.error)
            }
            Ok(other) => anyhow::anyhow!(
                "unexpected reply '{}'",
                koan_protocol::Message::kind(&other)
            ),
            Err(error) => error,
        };
        koan_telemetry::record_failure(&span, "not_submitted", &format!("{failure:#}"));
        Err(failure)
    }

    /// Submits `start_backup`.
    pub async fn start_backup(&self, command: StartBackup) -> Result<Submitted> {
        self.start(Command::StartBackup(command)).await
    }

    /// Submits `start_restore`.
    pub async fn start_restore(&self, command: StartRestore) -> Result<Submitted> {
        self.start(Command::StartRestore(command)).await
    }

    /// Submits `verify`.
    pub async fn verify(&self, command: VerifyBackup) -> Result<Submitted> {
        self.start(Command::Verify(command)).await
    }

    /// Submits `replay` of a restore's failed rows.
    pub async fn replay(&self, command: ReplayRows) -> Result<Submitted> {
        self.start(Command::Replay(command)).await
    }

    /// Submits `pause`.
    pub async fn pause(&self, operation_id: Uuid) -> Result<Submitted> {
        self.start(Command::Pause(OperationRef { operation_id }))
            .await
    }

    /// Submits `resume`, by operation id or continuation token.
    pub async fn resume(&self, command: ResumeOperation) -> Result<Submitted> {
        self.start(Command::Resume(command)).await
    }

    /// Submits `cancel`.
    pub async fn cancel(&self, operation_id: Uuid) -> Result<Submitted> {
        self.start(Command::Cancel(OperationRef { operation_id }))
            .await
    }

    /// The failed rows of a restore.
    pub async fn diagnostics(&self, query: DiagnosticsQuery) -> Result<Diagnostics> {
        match self.request(&Command::Diagnostics(query)).await? {
            Reply::Diagnostics(diagnostics) => Ok(diagnostics),
            Reply::Rejected(rejected) => bail!("{}", rejected.error),
            other => bail!(
                "unexpected reply '{}'",
                koan_protocol::Message::kind(&other)
            ),
        }
    }

    /// The progress report of one operation.
    pub async fn status(&self, operation_id: Uuid) -> Result<ProgressReport> {
        match self
            .request(&Command::Status(OperationRef { operation_id }))
            .await?
        {
            Reply::Status(report) => Ok(report),
            Reply::Rejected(rejected) => bail!("{}", rejected.error),
            other => bail!(
                "unexpected reply '{}'",
                koan_protocol::Message::kind(&other)
            ),
        }
    }

    /// Recent operations, newest first.
    pub async fn list(&self, limit: u32) -> Result<Vec<ProgressReport>> {
        match self
            .request(&Command::List(ListOperations { limit: Some(limit) }))
            .await?
        {
            Reply::Operations(operations) => Ok(operations.operations),
            Reply::Rejected(rejected) => bail!("{}", rejected.error),
            other => bail!(
                "unexpected reply '{}'",
                koan_protocol::Message::kind(&other)
            ),
        }
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.broker.close().await;
    }
}

fn command_routing_key(command: &Command) -> &'static str {
    koan_protocol::Message::kind(command)
}
