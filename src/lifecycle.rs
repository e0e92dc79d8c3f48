//! `pause`, `resume` and `cancel`: submit, print the outcome, optionally follow.
//!
//! Exit codes: 0 when the command took effect (and, when following, the
//! operation reached the wanted end), 2 when the coordinator rejected it
//! (the reason is printed), otherwise as `follow` says.

use anyhow::Result;
use koan_protocol::commands::ResumeOperation;
use koan_protocol::progress::OperationState;
use uuid::Uuid;

use crate::client::Client;
use crate::follow;

/// `koan-backup pause ID`: prints the state and the continuation token.
pub async fn pause(amqp_url: &str, operation_id: Uuid) -> Result<u8> {
    let client = Client::connect(amqp_url).await?;
    let outcome = pause_with(&client, operation_id).await;
    client.close().await;
    outcome
}

async fn pause_with(client: &Client, operation_id: Uuid) -> Result<u8> {
    let submitted = client.pause(operation_id).await?;
    let report = client.status(submitted.operation_id).await?;
    let already = if submitted.existing {
        " (already paused)"
    } else {
        ""
    };
    println!(
        "operation {} is {}{already}",
        report.operation_id,
        report.state.as_str()
    );
    if let Some(token) = &report.continuation_token {
        println!("token {token}");
        eprintln!("resume with: koan-backup resume --token {token}");
    }
    Ok(0)
}

/// `koan-backup resume (ID | --token TOKEN) [--follow]`.
pub async fn resume(
    amqp_url: &str,
    operation_id: Option<Uuid>,
    token: Option<String>,
    follow: bool,
) -> Result<u8> {
    let client = Client::connect(amqp_url).await?;
    let outcome = resume_with(&client, operation_id, token, follow).await;
    client.close().await;
    outcome
}

async fn resume_with(
    client: &Client,
    operation_id: Option<Uuid>,
    token: Option<String>,
    follow: bool,
) -> Result<u8> {
    // The operation id is known up front only when given; with a token alone
    // it comes back in the reply, and following starts from a status read.
    let events = match (follow, operation_id) {
        (true, Some(operation_id)) => Some(client.follow(operation_id).await?),
        _ => None,
    };
    let submitted = client
        .resume(ResumeOperation {
            operation_id,
            token,
        })
        .await?;
    let already = if submitted.existing {
        " (it was not paused)"
    } else {
        ""
    };
    println!("operation {} resumed{already}", submitted.operation_id);
    if !follow {
        return Ok(0);
    }
    let events = match events {
        Some(events) => events,
        None => client.follow(submitted.operation_id).await?,
    };
    let report = client.status(submitted.operation_id).await?;
    let outcome = if report.state.is_terminal() {
        events.close().await;
        follow::Outcome { report }
    } else {
        follow::follow(client, events, submitted.operation_id, false).await?
    };
    eprintln!("{}", follow::conclusion(&outcome.report));
    Ok(outcome.exit_code())
}

/// `koan-backup cancel ID [--follow]`.
pub async fn cancel(amqp_url: &str, operation_id: Uuid, follow: bool) -> Result<u8> {
    let client = Client::connect(amqp_url).await?;
    let outcome = cancel_with(&client, operation_id, follow).await;
    client.close().await;
    outcome
}

async fn cancel_with(client: &Client, operation_id: Uuid, follow: bool) -> Result<u8> {
    let events = if follow {
        Some(client.follow(operation_id).await?)
    } else {
        None
    };
    let submitted = client.cancel(operation_id).await?;
    let already = if submitted.existing {
        " (already cancelled)"
    } else {
        ""
    };
    println!("operation {} cancelled{already}", submitted.operation_id);
    let Some(events) = events else {
        return Ok(0);
    };
    let report = client.status(operation_id).await?;
    let report = if report.state.is_terminal() {
        events.close().await;
        report
    } else {
        follow::follow(client, events, operation_id, false)
            .await?
            .report
    };
    eprintln!("{}", follow::conclusion(&report));
    Ok(if report.state == OperationState::Cancelled {
        0
    } else {
        1
    })
}
