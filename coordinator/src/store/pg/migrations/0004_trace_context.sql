-- koan-coordinator state, version 4: trace context.
-- An operation keeps the W3C trace context of the coordinator span that
-- accepted its command; every outbox message queued for it copies that
-- context at enqueue, so jobs published later (by any coordinator) still
-- belong to the operation's trace. NULL: the command carried no trace.
ALTER TABLE {schema}.operations
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text;

ALTER TABLE {schema}.outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text;
