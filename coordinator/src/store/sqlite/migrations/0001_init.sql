-- koan-coordinator state in SQLite (embedded single-node mode), version 1.
-- The same tables as the PostgreSQL store after its migration 3. UUIDs are
-- TEXT (lowercase, hyphenated), times INTEGER microseconds since the Unix
-- epoch (UTC), JSON documents TEXT, booleans INTEGER 0 or 1.

-- Deployment-wide settings; `token_secret` (32 random bytes) signs continuation tokens.
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;

-- One row per operation. Counters are maintained incrementally by each applied
-- report; `percent` only grows; `sequence` counts changes and
-- `published_sequence` the last one announced by a public event.
CREATE TABLE operations (
    id                 TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,
    state              TEXT NOT NULL,
    plan               TEXT NOT NULL,
    plan_id            TEXT NOT NULL,
    backup_id          TEXT,
    consistency        TEXT NOT NULL,
    labels             TEXT NOT NULL DEFAULT '{}',
    description        TEXT,
    command_id         TEXT UNIQUE,
    entities_total     INTEGER NOT NULL,
    entities_planned   INTEGER NOT NULL DEFAULT 0,
    rows_total         INTEGER NOT NULL DEFAULT 0,
    rows_durable       INTEGER NOT NULL DEFAULT 0,
    rows_pending       INTEGER NOT NULL DEFAULT 0,
    bytes_raw          INTEGER NOT NULL DEFAULT 0,
    bytes_raw_pending  INTEGER NOT NULL DEFAULT 0,
    bytes_compressed   INTEGER NOT NULL DEFAULT 0,
    parts_done         INTEGER NOT NULL DEFAULT 0,
    chunks_total       INTEGER NOT NULL DEFAULT 0,
    chunks_done        INTEGER NOT NULL DEFAULT 0,
    percent            REAL NOT NULL DEFAULT 0,
    sequence           INTEGER NOT NULL DEFAULT 0,
    published_sequence INTEGER NOT NULL DEFAULT 0,
    published_at       INTEGER,
    manifest           TEXT,
    error              TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    running_since      INTEGER,
    finished_at        INTEGER,
    -- Restores, replays and verifies.
    mode               TEXT,
    source_operation   TEXT,
    target_scope       TEXT,
    pool               TEXT,
    rows_written       INTEGER NOT NULL DEFAULT 0,
    rows_skipped       INTEGER NOT NULL DEFAULT 0,
    rows_failed        INTEGER NOT NULL DEFAULT 0,
    problems           TEXT NOT NULL DEFAULT '[]',
    -- Pause, resume and cancel.
    paused_at          INTEGER,
    notes              TEXT NOT NULL DEFAULT '[]',
    discarded_objects  INTEGER
) STRICT;
CREATE INDEX operations_newest ON operations (created_at DESC, id DESC);
CREATE INDEX operations_unannounced ON operations (published_at)
    WHERE published_sequence < sequence;
CREATE INDEX operations_backups ON operations (backup_id) WHERE kind = 'backup';

-- The entities of an operation, in plan order. `staging_table`: restores in
-- `replace` mode.
CREATE TABLE entities (
    operation_id      TEXT NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    name              TEXT NOT NULL,
    ordinal           INTEGER NOT NULL,
    spec              TEXT NOT NULL,
    state             TEXT NOT NULL,
    rows_total        INTEGER NOT NULL DEFAULT 0,
    rows_durable      INTEGER NOT NULL DEFAULT 0,
    rows_pending      INTEGER NOT NULL DEFAULT 0,
    bytes_raw         INTEGER NOT NULL DEFAULT 0,
    bytes_raw_pending INTEGER NOT NULL DEFAULT 0,
    bytes_compressed  INTEGER NOT NULL DEFAULT 0,
    chunks_total      INTEGER NOT NULL DEFAULT 0,
    chunks_done       INTEGER NOT NULL DEFAULT 0,
    snapshot          TEXT,
    staging_table     TEXT,
    PRIMARY KEY (operation_id, name),
    UNIQUE (operation_id, ordinal)
) STRICT;

-- One row per key range of a planned entity. `owner_run` is the fencing
-- token: only reports from that run change the chunk.
CREATE TABLE chunks (
    operation_id     TEXT NOT NULL,
    entity           TEXT NOT NULL,
    chunk            INTEGER NOT NULL,
    lo               TEXT,
    hi               TEXT,
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    failures         INTEGER NOT NULL DEFAULT 0,
    owner_run        TEXT,
    worker           TEXT,
    lease_until      INTEGER,
    rows_durable     INTEGER NOT NULL DEFAULT 0,
    rows_pending     INTEGER NOT NULL DEFAULT 0,
    raw_bytes        INTEGER NOT NULL DEFAULT 0,
    raw_pending      INTEGER NOT NULL DEFAULT 0,
    compressed_bytes INTEGER NOT NULL DEFAULT 0,
    parts            INTEGER NOT NULL DEFAULT 0,
    parts_expected   INTEGER,
    error            TEXT,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (operation_id, entity, chunk),
    FOREIGN KEY (operation_id, entity)
        REFERENCES entities (operation_id, name) ON DELETE CASCADE
) STRICT;
CREATE INDEX chunks_leases ON chunks (lease_until) WHERE state = 'running';

-- Durable parts, as accepted from their chunk's owner run.
CREATE TABLE parts (
    operation_id     TEXT NOT NULL,
    entity           TEXT NOT NULL,
    chunk            INTEGER NOT NULL,
    part             INTEGER NOT NULL,
    run              TEXT NOT NULL,
    path             TEXT NOT NULL,
    first_key        TEXT,
    last_key         TEXT,
    rows             INTEGER NOT NULL,
    raw_bytes        INTEGER NOT NULL,
    compressed_bytes INTEGER NOT NULL,
    blake3           TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (operation_id, entity, chunk, part),
    FOREIGN KEY (operation_id, entity, chunk)
        REFERENCES chunks (operation_id, entity, chunk) ON DELETE CASCADE
) STRICT;

-- Jobs and public events, written in the transaction of the change that
-- caused them and published in id order by the drainer. AUTOINCREMENT: an id
-- is never handed out twice, even once the outbox was emptied.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL,
    exchange    TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    kind        TEXT NOT NULL,
    payload     BLOB NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- One row per archived part a restore imports (its unit of work: the
-- restore's "chunks"). `state` is `pending` or `imported`; the first
-- `part_imported` wins. `failures` counts retryable import failures.
CREATE TABLE restore_units (
    operation_id  TEXT NOT NULL,
    entity        TEXT NOT NULL,
    unit          INTEGER NOT NULL,
    chunk         INTEGER NOT NULL,
    part          TEXT NOT NULL,
    rows          INTEGER NOT NULL,
    state         TEXT NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0,
    rows_written  INTEGER NOT NULL DEFAULT 0,
    rows_skipped  INTEGER NOT NULL DEFAULT 0,
    rows_failed   INTEGER NOT NULL DEFAULT 0,
    raw_bytes     INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (operation_id, entity, unit),
    FOREIGN KEY (operation_id, entity)
        REFERENCES entities (operation_id, name) ON DELETE CASCADE
) STRICT;

-- Rows a restore could not write, with the raw line to replay them. Ids are
-- shown to clients and named by replays: never reused (AUTOINCREMENT).
CREATE TABLE restore_diagnostics (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    operation_id TEXT NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    entity       TEXT NOT NULL,
    key          TEXT,
    part         TEXT,
    line_no      INTEGER,
    code         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    line         TEXT NOT NULL,
    resolved     INTEGER NOT NULL DEFAULT 0,
    resolved_by  TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX restore_diagnostics_listing ON restore_diagnostics (operation_id, id);
CREATE INDEX restore_diagnostics_unresolved ON restore_diagnostics (operation_id, entity, id)
    WHERE resolved = 0;

-- The batches of a replay (one `replay_rows` job each) and the diagnostics
-- each carries. A batch is `reported` once its first `replay_done` arrived;
-- an item's `outcome` is set once (`resolved` may still replace `failed`).
CREATE TABLE replay_batches (
    operation_id TEXT NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    batch        INTEGER NOT NULL,
    entity       TEXT NOT NULL,
    reported     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (operation_id, batch)
) STRICT;
CREATE TABLE replay_items (
    operation_id  TEXT NOT NULL,
    diagnostic_id INTEGER NOT NULL REFERENCES restore_diagnostics (id) ON DELETE CASCADE,
    batch         INTEGER NOT NULL,
    outcome       TEXT,
    PRIMARY KEY (operation_id, diagnostic_id),
    FOREIGN KEY (operation_id, batch)
        REFERENCES replay_batches (operation_id, batch) ON DELETE CASCADE
) STRICT;
CREATE INDEX replay_items_batch ON replay_items (operation_id, batch);
