//! The coordinator's side of RabbitMQ.
//!
//! **Consuming** ([`consume`]): in order; ack (or dead-letter) only after the
//! state store committed and the reply was published. A handler that batches
//! ([`Handler::batch_size`] > 1, the worker reports) takes every delivery
//! already sent within the prefetch and decides them together
//! ([`Handler::handle_batch`]: one state store transaction), then publishes
//! the replies together and settles each; when the batch as a whole fails,
//! its deliveries are handled one at a time. A state store failure that may
//! pass (connection lost) is retried in place with backoff, so a PostgreSQL
//! restart does not burn the message's delivery limit; on shutdown the
//! messages in hand are left unacked and go back to the queue.
//!
//! Each delivery is handled in its handler's span, the child of the span that
//! published it ([`Handler::span`]).
//!
//! **Publishing** ([`drain_loop`]): the outbox drainer publishes queued jobs
//! and events in order, a batch at a time with the publisher confirms
//! awaited together, and removes them once confirmed. Each carries the trace context stored with its operation. It is woken after every commit that queued something and every
//! 500 ms. The state store drains under an advisory lock, so of several
//! coordinators one drains at a time and no message is published twice by two
//! drainers; a crash between publishing and removing republishes (consumers
//! are idempotent).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, warn};

use koan_protocol::topology::JOBS_EXCHANGE;
use koan_transport::{Broker, Incoming, Outgoing, rpc, topology};

use crate::error::CoordinatorError;
use crate::store::{OutboxMessage, OutboxSink, StateStore};

/// What to do with a delivery once handled.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// Answer on the delivery's `reply_to`, if it has one.
    pub reply: Option<Outgoing>,
    /// Dead-letter the delivery with this reason instead of acking it.
    pub dead_letter: Option<String>,
    /// The state store changed: wake the outbox drainer.
    pub changed: bool,
}

/// Handles the deliveries of one queue.
pub trait Handler: Send + Sync {
    /// Decides on one delivery. An error that is retryable is retried;
    /// any other dead-letters the delivery.
    fn handle(
        &self,
        incoming: &Incoming,
    ) -> impl Future<Output = Result<Decision, CoordinatorError>> + Send;

    /// Most deliveries decided together by [`Handler::handle_batch`]; 1
    /// (the default): one at a time.
    fn batch_size(&self) -> usize {
        1
    }

    /// Decides on deliveries that arrived together, in order: one decision
    /// (or error, that delivery's own) per delivery, in order; an error for
    /// the batch as a whole when nothing was decided, and then each is
    /// handled on its own. By default, [`Handler::handle`] for each.
    fn handle_batch(
        &self,
        batch: &[Delivery],
    ) -> impl Future<Output = Result<Vec<Result<Decision, CoordinatorError>>, CoordinatorError>> + Send
    {
        async move {
            let mut decisions = Vec::with_capacity(batch.len());
            for delivery in batch {
                decisions.push(
                    self.handle(&delivery.incoming)
                        .instrument(delivery.span.clone())
                        .await,
                );
            }
            Ok(decisions)
        }
    }

    /// The span the delivery is handled, replied to and settled in: a child
    /// of the span that published it (see [`crate::spans`]).
    fn span(&self, incoming: &Incoming) -> Span {
        let span = tracing::info_span!(
            "delivery",
            queue = %incoming.queue,
            kind = incoming.kind.as_deref().unwrap_or("unknown"),
            trace_id = tracing::field::Empty,
        );
        koan_telemetry::adopt(&span, incoming.trace_context().as_ref());
        span
    }
}

/// A delivery of a batch, with the span it is handled in.
#[derive(Debug)]
pub struct Delivery {
    /// The delivery.
    pub incoming: Incoming,
    /// Its span ([`Handler::span`]).
    pub span: Span,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// Consumes `queue` with `prefetch` until `stop` is cancelled or the channel fails.
pub async fn consume<H: Handler>(
    broker: &Broker,
    queue: &str,
    prefetch: u16,
    handler: &H,
    stop: &CancellationToken,
    wake: &Notify,
) -> Result<(), CoordinatorError> {
    let mut subscription = broker.subscribe(queue, prefetch).await?;
    debug!(queue, prefetch, "consuming");
    let outcome = loop {
        let incoming = tokio::select! {
            biased;
            () = stop.cancelled() => break Ok(()),
            next = subscription.next() => match next {
                Ok(incoming) => incoming,
                Err(error) => break Err(CoordinatorError::from(error)),
            },
        };
        let mut batch = vec![incoming];
        let mut broken = None;
        while batch.len() < handler.batch_size() {
            match subscription.try_next() {
                None => break,
                Some(Ok(incoming)) => batch.push(incoming),
                Some(Err(error)) => {
                    broken = Some(CoordinatorError::from(error));
                    break;
                }
            }
        }
        let settled = if batch.len() == 1 {
            let incoming = &batch[0];
            settle(broker, incoming, handler, stop, wake)
                .instrument(handler.span(incoming))
                .await
        } else {
            let batch: Vec<Delivery> = batch
                .into_iter()
                .map(|incoming| Delivery {
                    span: handler.span(&incoming),
                    incoming,
                })
                .collect();
            settle_batch(broker, &batch, handler, stop, wake).await
        };
        if let Err(error) = settled {
            break Err(error);
        }
        if let Some(error) = broken {
            break Err(error);
        }
    };
    subscription.cancel().await;
    subscription.close().await;
    outcome
}

/// Handles one delivery to the end: decision, reply, then ack or dead-letter.
async fn settle<H: Handler>(
    broker: &Broker,
    incoming: &Incoming,
    handler: &H,
    stop: &CancellationToken,
    wake: &Notify,
) -> Result<(), CoordinatorError> {
    let mut delay = FIRST_RETRY;
    let decision = loop {
        match handler.handle(incoming).await {
            Ok(decision) => break decision,
            Err(error) if error.is_transport() => return Err(error),
            Err(error) if error.is_retryable() => {
                warn!(queue = %incoming.queue, code = error.code(), %error, retry_in = ?delay, "handling failed, retrying");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(LAST_RETRY);
            }
            Err(error) => {
                warn!(queue = %incoming.queue, code = error.code(), %error, "message dead-lettered");
                koan_telemetry::record_failure(&Span::current(), error.code(), &error.to_string());
                break Decision {
                    dead_letter: Some(format!("{}: {error}", error.code())),
                    ..Decision::default()
                };
            }
        }
    };
    if decision.changed {
        wake.notify_one();
    }
    if let Some(reply) = decision.reply {
        rpc::reply(broker, incoming, reply).await?;
    }
    match decision.dead_letter {
        Some(reason) => incoming.dead_letter(broker, &reason).await?,
        None => incoming.ack().await?,
    }
    Ok(())
}

/// Handles deliveries that arrived together: decided in one go, replies
/// published together, then each acked or dead-lettered. A batch that fails
/// as a whole is handled again one delivery at a time; a delivery whose own
/// error may pass is handled again on its own.
async fn settle_batch<H: Handler>(
    broker: &Broker,
    batch: &[Delivery],
    handler: &H,
    stop: &CancellationToken,
    wake: &Notify,
) -> Result<(), CoordinatorError> {
    let decisions = match handler.handle_batch(batch).await {
        Ok(decisions) if decisions.len() == batch.len() => decisions,
        Ok(_) => return settle_each(broker, batch, handler, stop, wake).await,
        Err(error) if error.is_transport() => return Err(error),
        Err(error) => {
            debug!(queue = %batch[0].incoming.queue, size = batch.len(), code = error.code(), %error,
                "batch not applied, handling its deliveries one at a time");
            return settle_each(broker, batch, handler, stop, wake).await;
        }
    };
    let mut settled = Vec::with_capacity(batch.len());
    let mut again = Vec::new();
    for (delivery, decision) in batch.iter().zip(decisions) {
        match decision {
            Ok(decision) => settled.push((delivery, decision)),
            Err(error) if error.is_transport() => return Err(error),
            Err(error) if error.is_retryable() => again.push(delivery),
            Err(error) => {
                let _entered = delivery.span.enter();
                warn!(queue = %delivery.incoming.queue, code = error.code(), %error, "message dead-lettered");
                koan_telemetry::record_failure(&delivery.span, error.code(), &error.to_string());
                settled.push((
                    delivery,
                    Decision {
                        dead_letter: Some(format!("{}: {error}", error.code())),
                        ..Decision::default()
                    },
                ));
            }
        }
    }
    if settled.iter().any(|(_, decision)| decision.changed) {
        wake.notify_one();
    }
    let replies: Vec<Outgoing> = settled
        .iter_mut()
        .filter_map(|(delivery, decision)| {
            let reply = decision.reply.take()?;
            let reply = reply.trace(koan_telemetry::context_of(&delivery.span).as_ref());
            rpc::reply_to(&delivery.incoming, reply)
        })
        .collect();
    if !replies.is_empty() {
        let (_, published) = broker.publish_batch(&replies).await;
        published?;
    }
    for (delivery, decision) in settled {
        let incoming = &delivery.incoming;
        match decision.dead_letter {
            Some(reason) => {
                incoming
                    .dead_letter(broker, &reason)
                    .instrument(delivery.span.clone())
                    .await?;
            }
            None => incoming.ack().await?,
        }
    }
    for delivery in again {
        settle(broker, &delivery.incoming, handler, stop, wake)
            .instrument(delivery.span.clone())
            .await?;
    }
    Ok(())
}

/// Handles each delivery of a batch on its own, in order.
async fn settle_each<H: Handler>(
    broker: &Broker,
    batch: &[Delivery],
    handler: &H,
    stop: &CancellationToken,
    wake: &Notify,
) -> Result<(), CoordinatorError> {
    for delivery in batch {
        if stop.is_cancelled() {
            // Left unacked: back to the queue with the connection.
            return Ok(());
        }
        settle(broker, &delivery.incoming, handler, stop, wake)
            .instrument(delivery.span.clone())
            .await?;
    }
    Ok(())
}

/// Messages taken per drain transaction.
pub const DRAIN_BATCH: usize = 200;
/// Drain at least this often, even unwoken.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(500);

/// Publishes outbox messages on a broker, declaring each pool's queue before
/// its first job so no job is unroutable.
#[derive(Debug)]
pub struct BrokerSink<'b> {
    broker: &'b Broker,
    declared_pools: Mutex<HashSet<String>>,
}

impl<'b> BrokerSink<'b> {
    /// A sink on `broker`, with no pool declared yet.
    pub fn new(broker: &'b Broker) -> Self {
        Self {
            broker,
            declared_pools: Mutex::new(HashSet::new()),
        }
    }

    /// Remembers that `pool`'s queue is declared.
    pub fn declared(&self, pool: &str) {
        if let Ok(mut pools) = self.declared_pools.lock() {
            pools.insert(pool.to_string());
        }
    }

    fn is_declared(&self, pool: &str) -> bool {
        self.declared_pools
            .lock()
            .map(|pools| pools.contains(pool))
            .unwrap_or(false)
    }
}

impl BrokerSink<'_> {
    /// Declares the pool queue of a job before its first job.
    async fn declare_for(&self, message: &OutboxMessage) -> Result<(), CoordinatorError> {
        if message.exchange == JOBS_EXCHANGE && !self.is_declared(&message.routing_key) {
            topology::declare_pool(self.broker, &message.routing_key).await?;
            self.declared(&message.routing_key);
            debug!(pool = %message.routing_key, "pool queue declared");
        }
        Ok(())
    }
}

fn outgoing(message: &OutboxMessage) -> Outgoing {
    Outgoing {
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
        payload: message.payload.clone(),
        kind: message.kind.clone(),
        message_id: message.message_id.to_string(),
        correlation_id: None,
        reply_to: None,
        headers: Vec::new(),
    }
    .trace(message.trace.as_ref())
}

impl OutboxSink for BrokerSink<'_> {
    async fn publish(&self, message: &OutboxMessage) -> Result<(), CoordinatorError> {
        self.declare_for(message).await?;
        self.broker.publish(&outgoing(message)).await?;
        Ok(())
    }

    async fn publish_batch(
        &self,
        messages: &[OutboxMessage],
    ) -> (usize, Result<(), CoordinatorError>) {
        for message in messages {
            if let Err(error) = self.declare_for(message).await {
                return (0, Err(error));
            }
        }
        let outgoing: Vec<Outgoing> = messages.iter().map(outgoing).collect();
        let (confirmed, outcome) = self.broker.publish_batch(&outgoing).await;
        (confirmed, outcome.map_err(CoordinatorError::from))
    }
}

/// Drains until the outbox is empty (or another coordinator holds it).
/// Only a broker failure is an error; a state store failure waits for the next round.
pub async fn drain_now<S: StateStore>(
    store: &S,
    sink: &BrokerSink<'_>,
) -> Result<usize, CoordinatorError> {
    let mut published = 0;
    loop {
        match store.drain_outbox(sink, DRAIN_BATCH).await {
            Ok(drained) => {
                published += drained.published;
                if drained.busy || drained.published < DRAIN_BATCH {
                    return Ok(published);
                }
            }
            Err(error) if error.is_transport() => return Err(error),
            Err(error) => {
                warn!(code = error.code(), %error, "draining the outbox failed");
                return Ok(published);
            }
        }
    }
}

/// Drains whenever woken and every [`DRAIN_INTERVAL`] until `stop` is cancelled.
pub async fn drain_loop<S: StateStore>(
    store: &S,
    sink: &BrokerSink<'_>,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), CoordinatorError> {
    loop {
        let published = drain_now(store, sink).await?;
        if published > 0 {
            debug!(published, "outbox drained");
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            () = wake.notified() => {}
            () = tokio::time::sleep(DRAIN_INTERVAL) => {}
        }
    }
}
