-- koan-coordinator state (SQLite), version 2: trace context.
-- An operation keeps the W3C trace context of the coordinator span that
-- accepted its command; every outbox message queued for it copies that
-- context at enqueue, so jobs published later still belong to the
-- operation's trace. NULL: the command carried no trace.
ALTER TABLE operations ADD COLUMN traceparent TEXT;
ALTER TABLE operations ADD COLUMN tracestate TEXT;
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN tracestate TEXT;
