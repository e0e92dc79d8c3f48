#!/usr/bin/env python3
"""A koan-backup client in Python, written from protocol/PROTOCOL.md alone.

Submits `start_backup` with an inline plan, waits for `accepted`, follows the
operation's public events and exits 0 when it sees `completed`.

Environment: KOAN_AMQP_URL, KOAN_TABLE (source table), KOAN_SCOPE (tenant).
Prints `accepted <id>`, one `progress <percent>` line per progress event and
finally `completed <percent> <rows_done>`.
"""

import os
import sys
import uuid

import msgpack
import pika

PROTOCOL = 1


def envelope(kind, body):
    return msgpack.packb({"protocol": PROTOCOL, "kind": kind, "body": body})


def main():
    url = os.environ.get("KOAN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    operation_id = str(uuid.uuid4())

    # Follow before submitting, so no event is missed.
    events = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue=events, exchange="koan.events", routing_key=f"operation.{operation_id}.#")

    replies = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    correlation_id = str(uuid.uuid4())
    plan = {
        "plan_id": "python-client",
        "entities": [
            {"name": "orders", "table": os.environ["KOAN_TABLE"], "scope": os.environ["KOAN_SCOPE"], "chunk_rows": 2500}
        ],
    }
    channel.basic_publish(
        exchange="koan.commands",
        routing_key="start_backup",
        body=envelope("start_backup", {"plan": plan, "operation_id": operation_id, "labels": {"client": "python"}}),
        properties=pika.BasicProperties(
            content_type="application/msgpack",
            type="start_backup",
            reply_to=replies,
            correlation_id=correlation_id,
            delivery_mode=2,
        ),
    )

    reply = None
    for method, properties, body in channel.consume(replies, auto_ack=True, inactivity_timeout=60):
        if method is None:
            sys.exit("no reply from the coordinator within 60 s")
        if properties.correlation_id == correlation_id:
            reply = msgpack.unpackb(body)
            break
    channel.cancel()
    if reply["kind"] != "accepted":
        sys.exit(f"rejected: {reply['body']}")
    assert reply["body"]["operation_id"] == operation_id, reply
    print(f"accepted {operation_id}", flush=True)

    for method, properties, body in channel.consume(events, auto_ack=True, inactivity_timeout=240):
        if method is None:
            sys.exit("no event within 240 s")
        event = msgpack.unpackb(body)
        report = event["body"]
        assert method.routing_key == f"operation.{operation_id}.{event['kind']}", method.routing_key
        if event["kind"] == "progress":
            print(f"progress {report['percent']:.1f}", flush=True)
        elif event["kind"] == "completed":
            print(f"completed {report['percent']:.1f} {report['rows_done']}", flush=True)
            connection.close()
            return 0
        else:
            sys.exit(f"{event['kind']}: {report.get('error')}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
