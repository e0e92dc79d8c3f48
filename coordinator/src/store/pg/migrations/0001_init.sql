-- koan-coordinator state, version 1.
-- `{schema}` is replaced by the configured schema, quoted as an identifier.

-- Deployment-wide settings; `token_secret` (32 random bytes) signs continuation tokens.
CREATE TABLE {schema}.settings (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);

-- One row per operation. Counters are maintained incrementally by each applied
-- report; `percent` only grows; `sequence` counts changes and
-- `published_sequence` the last one announced by a public event.
CREATE TABLE {schema}.operations (
    id                 uuid PRIMARY KEY,
    kind               text NOT NULL,
    state              text NOT NULL,
    plan               jsonb NOT NULL,
    plan_id            text NOT NULL,
    backup_id          uuid,
    consistency        text NOT NULL,
    labels             jsonb NOT NULL DEFAULT '{}',
    description        text,
    command_id         text UNIQUE,
    entities_total     bigint NOT NULL,
    entities_planned   bigint NOT NULL DEFAULT 0,
    rows_total         bigint NOT NULL DEFAULT 0,
    rows_durable       bigint NOT NULL DEFAULT 0,
    rows_pending       bigint NOT NULL DEFAULT 0,
    bytes_raw          bigint NOT NULL DEFAULT 0,
    bytes_raw_pending  bigint NOT NULL DEFAULT 0,
    bytes_compressed   bigint NOT NULL DEFAULT 0,
    parts_done         bigint NOT NULL DEFAULT 0,
    chunks_total       bigint NOT NULL DEFAULT 0,
    chunks_done        bigint NOT NULL DEFAULT 0,
    percent            double precision NOT NULL DEFAULT 0,
    sequence           bigint NOT NULL DEFAULT 0,
    published_sequence bigint NOT NULL DEFAULT 0,
    published_at       timestamptz,
    manifest           text,
    error              text,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    running_since      timestamptz,
    finished_at        timestamptz
);
CREATE INDEX operations_newest ON {schema}.operations (created_at DESC, id DESC);
CREATE INDEX operations_unannounced ON {schema}.operations (published_at)
    WHERE published_sequence < sequence;

-- The entities of an operation, in plan order.
CREATE TABLE {schema}.entities (
    operation_id      uuid NOT NULL REFERENCES {schema}.operations (id) ON DELETE CASCADE,
    name              text NOT NULL,
    ordinal           integer NOT NULL,
    spec              jsonb NOT NULL,
    state             text NOT NULL,
    rows_total        bigint NOT NULL DEFAULT 0,
    rows_durable      bigint NOT NULL DEFAULT 0,
    rows_pending      bigint NOT NULL DEFAULT 0,
    bytes_raw         bigint NOT NULL DEFAULT 0,
    bytes_raw_pending bigint NOT NULL DEFAULT 0,
    bytes_compressed  bigint NOT NULL DEFAULT 0,
    chunks_total      bigint NOT NULL DEFAULT 0,
    chunks_done       bigint NOT NULL DEFAULT 0,
    snapshot          jsonb,
    PRIMARY KEY (operation_id, name),
    UNIQUE (operation_id, ordinal)
);

-- One row per key range of a planned entity. `owner_run` is the fencing
-- token: only reports from that run change the chunk.
CREATE TABLE {schema}.chunks (
    operation_id     uuid NOT NULL,
    entity           text NOT NULL,
    chunk            integer NOT NULL,
    lo               text,
    hi               text,
    state            text NOT NULL,
    attempt          integer NOT NULL,
    failures         integer NOT NULL DEFAULT 0,
    owner_run        text,
    worker           text,
    lease_until      timestamptz,
    rows_durable     bigint NOT NULL DEFAULT 0,
    rows_pending     bigint NOT NULL DEFAULT 0,
    raw_bytes        bigint NOT NULL DEFAULT 0,
    raw_pending      bigint NOT NULL DEFAULT 0,
    compressed_bytes bigint NOT NULL DEFAULT 0,
    parts            integer NOT NULL DEFAULT 0,
    parts_expected   integer,
    error            text,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (operation_id, entity, chunk),
    FOREIGN KEY (operation_id, entity)
        REFERENCES {schema}.entities (operation_id, name) ON DELETE CASCADE
);
CREATE INDEX chunks_leases ON {schema}.chunks (lease_until) WHERE state = 'running';

-- Durable parts, as accepted from their chunk's owner run.
CREATE TABLE {schema}.parts (
    operation_id     uuid NOT NULL,
    entity           text NOT NULL,
    chunk            integer NOT NULL,
    part             integer NOT NULL,
    run              text NOT NULL,
    path             text NOT NULL,
    first_key        text,
    last_key         text,
    rows             bigint NOT NULL,
    raw_bytes        bigint NOT NULL,
    compressed_bytes bigint NOT NULL,
    blake3           text NOT NULL,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (operation_id, entity, chunk, part),
    FOREIGN KEY (operation_id, entity, chunk)
        REFERENCES {schema}.chunks (operation_id, entity, chunk) ON DELETE CASCADE
);

-- Jobs and public events, written in the transaction of the change that
-- caused them and published in id order by the drainer.
CREATE TABLE {schema}.outbox (
    id          bigserial PRIMARY KEY,
    message_id  uuid NOT NULL,
    exchange    text NOT NULL,
    routing_key text NOT NULL,
    kind        text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
