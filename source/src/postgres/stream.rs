//! Streaming one key range out of PostgreSQL with `COPY ... TO STDOUT (FORMAT binary)`.
//!
//! A [`RowStream`] owns a pooled connection for its whole life. It ends its
//! transaction itself: `COMMIT` after the last row, `ROLLBACK` after a server
//! error. Dropped early, or after a malformed stream, it discards the
//! connection instead of returning it to the pool mid-`COPY` or mid-transaction.

use std::fmt;
use std::pin::Pin;

use futures::StreamExt;
use tokio_postgres::CopyOutStream;

use crate::error::SourceError;
use crate::postgres::copy::CopyParser;
use crate::postgres::session::Session;
use crate::rows::ExportRow;

enum State {
    Streaming,
    Done,
    Failed,
}

/// The rows of one key range, in key order.
pub struct RowStream {
    context: String,
    session: Option<Session>,
    copy: Pin<Box<CopyOutStream>>,
    parser: CopyParser<3>,
    state: State,
    rows: u64,
    bytes: u64,
}

impl fmt::Debug for RowStream {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RowStream")
            .field("context", &self.context)
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .field("buffered", &self.parser.buffered())
            .finish_non_exhaustive()
    }
}

impl RowStream {
    /// Starts `statement` (a `COPY ... TO STDOUT (FORMAT binary)`) on a session already inside its transaction.
    pub(crate) async fn start(
        session: Session,
        statement: &str,
        context: String,
    ) -> Result<Self, SourceError> {
        let copy = match session.client().copy_out(statement).await {
            Ok(copy) => copy,
            Err(error) => {
                let mapped = SourceError::query(context, error);
                session.abort().await;
                return Err(mapped);
            }
        };
        Ok(Self {
            context,
            session: Some(session),
            copy: Box::pin(copy),
            parser: CopyParser::new(),
            state: State::Streaming,
            rows: 0,
            bytes: 0,
        })
    }

    /// Next row, or `None` at the end of the range (the transaction is then
    /// already committed and the connection back in the pool).
    ///
    /// After an error every later call fails too: a failed stream never looks complete.
    /// Dropping the stream, or this future, at any point is safe: an unfinished
    /// transaction's connection is discarded, never returned to the pool.
    pub async fn next(&mut self) -> Result<Option<ExportRow>, SourceError> {
        loop {
            match self.state {
                State::Streaming => {}
                State::Done => return Ok(None),
                State::Failed => {
                    return Err(SourceError::decode(format!(
                        "{}: the row stream already failed",
                        self.context
                    )));
                }
            }
            match self.parser.next_tuple() {
                Ok(Some(fields)) => match ExportRow::from_fields(fields) {
                    Ok(row) => {
                        self.rows += 1;
                        return Ok(Some(row));
                    }
                    Err(error) => return Err(self.fail_discarding(error)),
                },
                Ok(None) => {}
                Err(error) => return Err(self.fail_discarding(error)),
            }
            match self.copy.next().await {
                Some(Ok(chunk)) => {
                    self.bytes += chunk.len() as u64;
                    if let Err(error) = self.parser.push(&chunk) {
                        return Err(self.fail_discarding(error));
                    }
                }
                Some(Err(error)) => {
                    self.state = State::Failed;
                    let mapped = SourceError::query(self.context.clone(), error);
                    if let Some(session) = self.session.take() {
                        if mapped.code() == "connection_lost" {
                            session.discard();
                        } else {
                            // The server ended the COPY with an error: the
                            // connection is idle in a failed transaction.
                            session.abort().await;
                        }
                    }
                    return Err(mapped);
                }
                None => return self.finish().await,
            }
        }
    }

    /// Rows handed out so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of COPY data received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    async fn finish(&mut self) -> Result<Option<ExportRow>, SourceError> {
        if let Err(error) = self.parser.finish() {
            return Err(self.fail_discarding(error));
        }
        self.state = State::Failed;
        if let Some(session) = self.session.take() {
            session.commit().await?;
        }
        self.state = State::Done;
        tracing::debug!(context = %self.context, rows = self.rows, bytes = self.bytes, "range exported");
        Ok(None)
    }

    fn fail_discarding(&mut self, error: SourceError) -> SourceError {
        self.state = State::Failed;
        if let Some(session) = self.session.take() {
            session.discard();
        }
        match error {
            SourceError::Decode { reason } => {
                SourceError::decode(format!("{}: {reason}", self.context))
            }
            other => other,
        }
    }
}
