-- koan-coordinator state, version 5: metrics.
-- `metered` is set once a coordinator took the ended operation for its
-- metrics (duration, rows and bytes by kind), so each ended operation is
-- counted once per deployment whichever coordinator takes it. Operations
-- that ended before this migration are not counted.
ALTER TABLE {schema}.operations
    ADD COLUMN metered boolean NOT NULL DEFAULT false;
UPDATE {schema}.operations SET metered = true WHERE finished_at IS NOT NULL;
CREATE INDEX operations_unmetered ON {schema}.operations (finished_at)
    WHERE finished_at IS NOT NULL AND NOT metered;
