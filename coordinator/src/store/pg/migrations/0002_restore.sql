-- koan-coordinator state, version 2: restores, replays, verifies and restore diagnostics.
-- `{schema}` is replaced by the configured schema, quoted as an identifier.

-- `kind` is now `backup`, `restore`, `replay` or `verify` (a replay is reported
-- as a restore). Restores keep their mode, target scope, pool override and
-- row outcomes; verifies their problems.
ALTER TABLE {schema}.operations
    ADD COLUMN mode             text,
    ADD COLUMN source_operation uuid,
    ADD COLUMN target_scope     text,
    ADD COLUMN pool             text,
    ADD COLUMN rows_written     bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_skipped     bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_failed      bigint NOT NULL DEFAULT 0,
    ADD COLUMN problems         jsonb NOT NULL DEFAULT '[]';
CREATE INDEX operations_backups ON {schema}.operations (backup_id) WHERE kind = 'backup';

-- Restores: the staging table of an entity (`replace` mode), from the plan.
ALTER TABLE {schema}.entities ADD COLUMN staging_table text;

-- One row per archived part a restore imports (its unit of work: the
-- restore's "chunks"). `state` is `pending` or `imported`; the first
-- `part_imported` wins. `failures` counts retryable import failures.
CREATE TABLE {schema}.restore_units (
    operation_id  uuid NOT NULL,
    entity        text NOT NULL,
    unit          integer NOT NULL,
    chunk         integer NOT NULL,
    part          jsonb NOT NULL,
    rows          bigint NOT NULL,
    state         text NOT NULL,
    failures      integer NOT NULL DEFAULT 0,
    rows_written  bigint NOT NULL DEFAULT 0,
    rows_skipped  bigint NOT NULL DEFAULT 0,
    rows_failed   bigint NOT NULL DEFAULT 0,
    raw_bytes     bigint NOT NULL DEFAULT 0,
    error         text,
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (operation_id, entity, unit),
    FOREIGN KEY (operation_id, entity)
        REFERENCES {schema}.entities (operation_id, name) ON DELETE CASCADE
);

-- Rows a restore could not write, with the raw line to replay them.
CREATE TABLE {schema}.restore_diagnostics (
    id           bigserial PRIMARY KEY,
    operation_id uuid NOT NULL REFERENCES {schema}.operations (id) ON DELETE CASCADE,
    entity       text NOT NULL,
    key          text,
    part         text,
    line_no      bigint,
    code         text NOT NULL,
    reason       text NOT NULL,
    line         text NOT NULL,
    resolved     boolean NOT NULL DEFAULT false,
    resolved_by  uuid,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX restore_diagnostics_listing ON {schema}.restore_diagnostics (operation_id, id);
CREATE INDEX restore_diagnostics_unresolved ON {schema}.restore_diagnostics (operation_id, entity, id)
    WHERE NOT resolved;

-- The batches of a replay (one `replay_rows` job each) and the diagnostics
-- each carries. A batch is `reported` once its first `replay_done` arrived;
-- an item's `outcome` is set once (`resolved` may still replace `failed`).
CREATE TABLE {schema}.replay_batches (
    operation_id uuid NOT NULL REFERENCES {schema}.operations (id) ON DELETE CASCADE,
    batch        integer NOT NULL,
    entity       text NOT NULL,
    reported     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (operation_id, batch)
);
CREATE TABLE {schema}.replay_items (
    operation_id  uuid NOT NULL,
    diagnostic_id bigint NOT NULL REFERENCES {schema}.restore_diagnostics (id) ON DELETE CASCADE,
    batch         integer NOT NULL,
    outcome       text,
    PRIMARY KEY (operation_id, diagnostic_id),
    FOREIGN KEY (operation_id, batch)
        REFERENCES {schema}.replay_batches (operation_id, batch) ON DELETE CASCADE
);
CREATE INDEX replay_items_batch ON {schema}.replay_items (operation_id, batch);
