-- koan-coordinator state (SQLite), version 3: metrics.
-- `metered` is set once the coordinator took the ended operation for its
-- metrics (duration, rows and bytes by kind), so each ended operation is
-- counted once. Operations that ended before this migration are not counted.
ALTER TABLE operations ADD COLUMN metered INTEGER NOT NULL DEFAULT 0;
UPDATE operations SET metered = 1 WHERE finished_at IS NOT NULL;
CREATE INDEX operations_unmetered ON operations (finished_at)
    WHERE finished_at IS NOT NULL AND metered = 0;
