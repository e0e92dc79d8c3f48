//! Streaming one key range out of SQLite.
//!
//! A reader thread of its own opens a read-only connection, runs the export
//! query (one statement: SQLite reads it from one consistent snapshot of the
//! database) and sends the rows, in batches of at most [`BATCH_ROWS`] rows or
//! [`BATCH_BYTES`] bytes, through a channel of [`CHANNEL_BATCHES`] batches. A
//! slow consumer blocks the thread, so memory stays at a few batches plus the
//! largest row, whatever the range holds. Dropping the [`SqliteRowStream`]
//! interrupts the statement; the thread then ends, closing its connection.

use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;
use koan_protocol::archive::KeyRange;
use koan_protocol::plan::{EntitySpec, KeyType};
use rusqlite::types::ValueRef;
use rusqlite::{InterruptHandle, Row, params_from_iter};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::error::{SourceError, sqlite};
use crate::rows::ExportRow;
use crate::sqlite::connection::{Access, open};
use crate::sqlite::ranges::{key_text, resolve_key_type};
use crate::sqlite::sql::EntitySql;

/// Most rows in one batch sent by the reader thread.
pub const BATCH_ROWS: usize = 256;
/// A batch is sent once it holds this many bytes of keys, versions and documents.
pub const BATCH_BYTES: usize = 1024 * 1024;
/// Batches the channel holds before the reader thread waits.
pub const CHANNEL_BATCHES: usize = 2;

enum Message {
    Rows(Vec<ExportRow>),
    Failed(SourceError),
    Done,
}

enum State {
    Streaming,
    Done,
    Failed,
}

/// What the reader thread needs to run one export.
pub(crate) struct ExportRequest {
    pub(crate) path: PathBuf,
    pub(crate) entity: EntitySpec,
    pub(crate) range: KeyRange,
    pub(crate) after_key: Option<String>,
    pub(crate) context: String,
}

/// The rows of one key range, in key order.
pub struct SqliteRowStream {
    context: String,
    receiver: mpsc::Receiver<Message>,
    batch: std::vec::IntoIter<ExportRow>,
    interrupt: InterruptHandle,
    state: State,
    rows: u64,
    bytes: u64,
}

impl fmt::Debug for SqliteRowStream {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SqliteRowStream")
            .field("context", &self.context)
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .field("buffered", &self.batch.len())
            .finish_non_exhaustive()
    }
}

impl SqliteRowStream {
    /// Starts the reader thread; returns once the query is prepared, so a
    /// missing table or column, or a bad bound, fails here rather than at the first row.
    pub(crate) async fn start(
        request: ExportRequest,
        permit: OwnedSemaphorePermit,
    ) -> Result<Self, SourceError> {
        let context = request.context.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (sender, receiver) = mpsc::channel(CHANNEL_BATCHES);
        std::thread::Builder::new()
            .name("koan-sqlite-export".into())
            .spawn(move || {
                let _permit = permit;
                read(request, ready_tx, sender);
            })
            .map_err(|error| SourceError::TaskFailed {
                context: context.clone(),
                reason: format!("cannot start the reader thread: {error}"),
            })?;
        let interrupt = ready_rx.await.map_err(|_| SourceError::TaskFailed {
            context: context.clone(),
            reason: "the reader thread ended before the query started".into(),
        })??;
        Ok(Self {
            context,
            receiver,
            batch: Vec::new().into_iter(),
            interrupt,
            state: State::Streaming,
            rows: 0,
            bytes: 0,
        })
    }

    /// Next row, or `None` at the end of the range (the reader's connection is then closed).
    ///
    /// After an error every later call fails too: a failed stream never looks complete.
    /// Dropping the stream, or this future, at any point is safe.
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
            if let Some(row) = self.batch.next() {
                self.rows += 1;
                return Ok(Some(row));
            }
            match self.receiver.recv().await {
                Some(Message::Rows(rows)) => {
                    self.bytes += rows.iter().map(row_bytes).sum::<u64>();
                    self.batch = rows.into_iter();
                }
                Some(Message::Done) => {
                    self.state = State::Done;
                    tracing::debug!(context = %self.context, rows = self.rows, bytes = self.bytes, "range exported");
                    return Ok(None);
                }
                Some(Message::Failed(error)) => {
                    self.state = State::Failed;
                    return Err(error);
                }
                None => {
                    self.state = State::Failed;
                    return Err(SourceError::TaskFailed {
                        context: self.context.clone(),
                        reason: "the reader thread ended without finishing the range".into(),
                    });
                }
            }
        }
    }

    /// Rows handed out so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of keys, versions and documents received from the reader so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }
}

impl Drop for SqliteRowStream {
    fn drop(&mut self) {
        if matches!(self.state, State::Streaming) {
            // The reader may be deep in a scan that matches nothing: stop it now.
            self.interrupt.interrupt();
        }
    }
}

fn row_bytes(row: &ExportRow) -> u64 {
    (row.key.len() + row.doc.len() + row.version.as_ref().map_or(0, Bytes::len)) as u64
}

/// The reader thread: opens, prepares, reports readiness, then sends the rows.
fn read(
    request: ExportRequest,
    ready: oneshot::Sender<Result<InterruptHandle, SourceError>>,
    sender: mpsc::Sender<Message>,
) {
    let ExportRequest {
        path,
        entity,
        range,
        after_key,
        context,
    } = request;
    let connection = match open(&path, Access::Read) {
        Ok(connection) => connection,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let prepared = resolve_key_type(&connection, &entity).and_then(|key_type| {
        let (query, params) =
            EntitySql::new(&entity)?.export_query(key_type, &range, after_key.as_deref())?;
        let statement = connection
            .prepare(&query)
            .map_err(|error| sqlite(context.clone(), error))?;
        Ok((key_type, statement, params))
    });
    let (key_type, mut statement, params) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(connection.get_interrupt_handle())).is_err() {
        return;
    }
    let mut rows = match statement.query(params_from_iter(params.iter())) {
        Ok(rows) => rows,
        Err(error) => {
            let _ = sender.blocking_send(Message::Failed(sqlite(context, error)));
            return;
        }
    };
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    loop {
        let message = match rows.next() {
            Ok(Some(row)) => match export_row(row, key_type, &entity) {
                Ok(exported) => {
                    batch_bytes += row_bytes(&exported);
                    batch.push(exported);
                    if batch.len() < BATCH_ROWS && batch_bytes < BATCH_BYTES as u64 {
                        continue;
                    }
                    batch_bytes = 0;
                    Message::Rows(std::mem::take(&mut batch))
                }
                Err(error) => Message::Failed(prefixed(&context, error)),
            },
            Ok(None) => {
                if !batch.is_empty()
                    && sender
                        .blocking_send(Message::Rows(std::mem::take(&mut batch)))
                        .is_err()
                {
                    return;
                }
                Message::Done
            }
            Err(error) => Message::Failed(sqlite(context.clone(), error)),
        };
        let last = !matches!(message, Message::Rows(_));
        if last && !batch.is_empty() {
            // Rows read before a failure are still delivered, in order.
            let _ = sender.blocking_send(Message::Rows(std::mem::take(&mut batch)));
        }
        // A closed channel means the stream was dropped: stop reading.
        if sender.blocking_send(message).is_err() || last {
            return;
        }
    }
}

fn export_row(
    row: &Row<'_>,
    key_type: KeyType,
    entity: &EntitySpec,
) -> Result<ExportRow, SourceError> {
    let field = |index: usize| {
        row.get_ref(index)
            .map_err(|error| sqlite("read a row", error))
    };
    let key = key_text(field(0)?, key_type, entity)?;
    let text = |name: &str, value: ValueRef<'_>| -> Result<Option<Bytes>, SourceError> {
        match value {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) => std::str::from_utf8(bytes)
                .map(|text| Some(Bytes::from(text.to_string())))
                .map_err(|error| SourceError::decode(format!("{name} is not UTF-8: {error}"))),
            other => Err(SourceError::decode(format!(
                "{name} is a {} value, not JSON text",
                other.data_type()
            ))),
        }
    };
    let version = text("version", field(1)?)?;
    let doc = text("document", field(2)?)?
        .ok_or_else(|| SourceError::decode("row with a NULL document"))?;
    Ok(ExportRow {
        key: Bytes::from(key),
        version,
        doc,
    })
}

fn prefixed(context: &str, error: SourceError) -> SourceError {
    match error {
        SourceError::Decode { reason } => SourceError::decode(format!("{context}: {reason}")),
        other => other,
    }
}
