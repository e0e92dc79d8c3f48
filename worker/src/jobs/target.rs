//! Where restores write: the [`RestoreStore`] the restore jobs use, and its
//! PostgreSQL implementation over `koan_source`'s import API.
//!
//! The jobs are generic over the store, as exports are over
//! [`ChunkSource`](super::ChunkSource), so their decisions (what to abort,
//! what to report, when to requeue) are tested without a database as well.

use std::future::Future;

use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::EntitySpec;
use koan_source::{
    ApplyOutcome, ImportLine, ImportOutcome, Source, SourceError, SourceImportSession, StagingForm,
};
use uuid::Uuid;

use crate::archive_line::ParsedLine;

/// The database a restore writes to.
pub trait RestoreStore: Send + Sync {
    /// One part's import: one transaction.
    type Session: ImportWriter;

    /// Checks the entity against the target, creating its table when it is
    /// missing and the entity has the Koan layout; returns it with the
    /// target's key type.
    fn prepare_target(
        &self,
        entity: &EntitySpec,
    ) -> impl Future<Output = Result<EntitySpec, SourceError>> + Send;

    /// `replace` mode: checks the target as [`Self::prepare_target`] does
    /// (or, for a missing Koan-layout table, prepares a load table that
    /// becomes it when applied) and creates the staging table of `entity`
    /// for `operation_id`; returns the entity with the target's key type,
    /// and the staging table's name.
    fn prepare_replace(
        &self,
        entity: &EntitySpec,
        operation_id: Uuid,
        target_scope: Option<&str>,
    ) -> impl Future<Output = Result<(EntitySpec, String), SourceError>> + Send;

    /// Drops a staging table (a missing one is not an error).
    fn drop_staging(
        &self,
        entity: &EntitySpec,
        table: &str,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Opens the transaction one part is imported in; `form` says how a
    /// `replace` import stages it (typed into a load table when there is one).
    fn begin_import(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
        form: StagingForm,
    ) -> impl Future<Output = Result<Self::Session, SourceError>> + Send;

    /// `replace` mode: replaces the scope's rows with the staged ones, in one transaction.
    fn apply_staged(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> impl Future<Output = Result<ApplyOutcome, SourceError>> + Send;
}

/// The rows of one import, written in one transaction.
pub trait ImportWriter: Send {
    /// Adds one row.
    fn push(
        &mut self,
        line: &ImportLine<'_>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Rolls back: nothing pushed is written.
    fn abort(self) -> impl Future<Output = ()> + Send;

    /// Writes the rows (rows that fail are isolated and listed) and commits.
    fn commit(self) -> impl Future<Output = Result<ImportOutcome, SourceError>> + Send;
}

impl ParsedLine {
    /// The line as the import API takes it.
    pub fn import_line<'a>(&'a self, line_no: u64, part: &'a str, raw: &'a str) -> ImportLine<'a> {
        ImportLine {
            line_no,
            part,
            key: &self.key,
            version: self.version.as_deref(),
            doc: self.doc.get(),
            raw,
        }
    }
}

impl RestoreStore for Source {
    type Session = SourceImportSession;

    async fn prepare_target(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        Source::prepare_target(self, entity).await
    }

    async fn prepare_replace(
        &self,
        entity: &EntitySpec,
        operation_id: Uuid,
        target_scope: Option<&str>,
    ) -> Result<(EntitySpec, String), SourceError> {
        Source::prepare_replace(self, entity, operation_id, target_scope).await
    }

    async fn drop_staging(&self, entity: &EntitySpec, table: &str) -> Result<(), SourceError> {
        Source::drop_staging(self, entity, table).await
    }

    async fn begin_import(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
        form: StagingForm,
    ) -> Result<SourceImportSession, SourceError> {
        Source::begin_import(self, entity, target, form).await
    }

    async fn apply_staged(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> Result<ApplyOutcome, SourceError> {
        Source::apply_staged(self, entity, target).await
    }
}

impl ImportWriter for SourceImportSession {
    async fn push(&mut self, line: &ImportLine<'_>) -> Result<(), SourceError> {
        SourceImportSession::push(self, line).await
    }

    async fn abort(self) {
        SourceImportSession::abort(self).await;
    }

    async fn commit(self) -> Result<ImportOutcome, SourceError> {
        SourceImportSession::commit(self).await
    }
}
