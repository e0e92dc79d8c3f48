-- koan-coordinator state, version 3: pause, resume and cancel.
-- `paused_at` is when the operation was last paused; `notes` are consistency
-- notes written into the manifest (for example: resumed at a new snapshot);
-- `discarded_objects` counts what a cancelled backup's discard removed.
ALTER TABLE {schema}.operations
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN notes jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN discarded_objects bigint;
