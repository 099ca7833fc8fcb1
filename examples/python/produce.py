#!/usr/bin/env python3
"""Produce records to the Event Stream Engine (ese) from outside it.

This is the example for producers in any language: it writes one UserUpsert
to users.upserts and one Twilio status callback ("delivered") as a WebhookRaw
to webhooks.status.raw, waits until the broker acknowledged both, and prints
`topic=.. partition=.. offset=..` for each (exit status 1 and the error if
one was not acknowledged).

    PY=$(scripts/python-examples | tail -1)     # venv with requirements.txt
    "$PY" examples/python/produce.py --brokers 127.0.0.1:9092 --attribute city=Paris
    SCHEMA_REGISTRY_PASSWORD=... "$PY" examples/python/produce.py --brokers ... \\
        --format confluent --registry http://127.0.0.1:18081/apis/ccompat/v7 --registry-user ese

Wire format. Values are Avro, written with the newest version of each schema
in schemas/. The engine reads both formats below whatever its own settings
(a Confluent-framed record needs schema-registry.url set in the engine).

* single-object (the engine's format without a registry): Avro single-object
  encoding, the bytes C3 01, the 8-byte CRC-64-AVRO (Rabin) fingerprint of the
  writer schema's Parsing Canonical Form, little-endian, then the Avro binary
  datum. fastavro's fingerprint (like Java's
  SchemaNormalization.parsingFingerprint64) is exactly those 8 bytes.
* confluent (with a registry): the byte 00, the 4-byte big-endian schema id,
  the datum; the schema is registered under the subject <topic>-value (topic
  name strategy), as the engine does. Basic auth: --registry-user and the
  password in the environment variable SCHEMA_REGISTRY_PASSWORD.

Records. users.upserts is keyed by the phone as sent (the users stage makes it
E.164); attributes are null, boolean, long, double or string. A WebhookRaw is
what the webhook bridge makes of a provider callback, keyed by MessageSid:
every form parameter in order, kind "status", path /webhooks/twilio/status,
content type application/x-www-form-urlencoded, received_at in epoch millis,
and event_id a UUID (the normalize stage dead-letters anything else; here a
UUIDv5 of MessageSid and status, so sending the same callback twice is kept
once, as the bridge does for a provider's retry). The normalize stage needs
MessageSid, MessageStatus (or SmsStatus) and, when present, a valid To.
"""

import argparse
import io
import json
import os
import sys
import time
import uuid
from pathlib import Path

import fastavro
from confluent_kafka import Producer
from fastavro.schema import fingerprint, to_parsing_canonical_form

SENDER = "+15005550006"  # the From of the callback: the number that sent the message


def newest_schema(directory, stem):
    """The text of the newest `<stem>.v<N>.avsc` in `directory`."""
    files = sorted(Path(directory).glob(f"{stem}.v*.avsc"), key=lambda p: int(p.name.split(".")[-2][1:]))
    if not files:
        sys.exit(f"produce.py: no {stem}.v*.avsc in {directory}")
    return files[-1].read_text()


def single_object_encoder(schema_text):
    """value dict -> C3 01, schema fingerprint (little-endian), Avro datum."""
    parsed = fastavro.parse_schema(json.loads(schema_text))
    # fastavro's CRC-64-AVRO hex string is already the 8 little-endian bytes.
    header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))

    def encode(topic, value):
        out = io.BytesIO()
        out.write(header)
        fastavro.schemaless_writer(out, parsed, value)
        return out.getvalue()

    return encode


def confluent_encoder(registry, schema_text):
    """value dict -> 00, schema id (big-endian), Avro datum; subject <topic>-value."""
    from confluent_kafka.schema_registry import topic_subject_name_strategy
    from confluent_kafka.serialization import MessageField, SerializationContext
    from confluent_kafka.schema_registry.avro import AvroSerializer

    serializer = AvroSerializer(
        registry,
        schema_text,
        conf={"auto.register.schemas": True, "subject.name.strategy": topic_subject_name_strategy},
    )
    return lambda topic, value: serializer(value, SerializationContext(topic, MessageField.VALUE))


def attribute(text):
    """k=v; v is taken as JSON when it is a JSON scalar (true, 41, 2.5, null), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected k=v, not {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value if value is None or isinstance(value, (bool, int, float, str)) else raw


def main():
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", required=True, help="Kafka bootstrap servers, host:port[,host:port]")
    p.add_argument("--users-topic", default="users.upserts")
    p.add_argument("--status-topic", default="webhooks.status.raw")
    p.add_argument("--schemas", default=str(here.parent.parent / "schemas"), help="folder of the .avsc files")
    p.add_argument("--format", choices=["single-object", "confluent"],
                   help="wire format (default: confluent with --registry, else single-object)")
    p.add_argument("--registry", help="Confluent-compatible schema registry URL")
    p.add_argument("--registry-user", help="basic auth user; password from $SCHEMA_REGISTRY_PASSWORD")
    p.add_argument("--phone", default="+14155550123", help="the user's phone, as sent; also the callback's To")
    p.add_argument("--message-sid", default="SM" + uuid.uuid4().hex, help="default: SM + 32 random hex digits")
    p.add_argument("--attribute", action="append", type=attribute, default=[], metavar="K=V",
                   help="a user attribute, repeatable")
    args = p.parse_args()
    fmt = args.format or ("confluent" if args.registry else "single-object")

    if fmt == "confluent":
        if not args.registry:
            p.error("--format confluent needs --registry")
        from confluent_kafka.schema_registry import SchemaRegistryClient

        conf = {"url": args.registry}
        if args.registry_user:
            conf["basic.auth.user.info"] = f"{args.registry_user}:{os.environ.get('SCHEMA_REGISTRY_PASSWORD', '')}"
        registry = SchemaRegistryClient(conf)
        encoder = lambda text: confluent_encoder(registry, text)  # noqa: E731
    else:
        encoder = single_object_encoder
    encode_user = encoder(newest_schema(args.schemas, "user_upsert"))
    encode_raw = encoder(newest_schema(args.schemas, "webhook_raw"))

    now = int(time.time() * 1000)
    user = {
        "event_id": str(uuid.uuid4()),
        "phone": args.phone,
        "attributes": dict(args.attribute),
        "occurred_at": now,
    }
    sid, status = args.message_sid, "delivered"
    params = [
        ("MessageSid", sid), ("SmsSid", sid),
        ("AccountSid", os.environ.get("TWILIO_ACCOUNT_SID", "AC" + "0" * 32)),
        ("From", SENDER), ("To", args.phone),
        ("MessageStatus", status), ("SmsStatus", status), ("ApiVersion", "2010-04-01"),
    ]
    callback = {
        "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"twilio-status:{sid}:{status}")),
        "kind": "status",
        "path": "/webhooks/twilio/status",
        "query": "",
        "params": [{"name": n, "value": v} for n, v in params],
        "body": None,
        "content_type": "application/x-www-form-urlencoded",
        "received_at": now,
    }

    try:  # a bad value, or a registry that refuses or cannot be reached
        user_bytes = encode_user(args.users_topic, user)
        callback_bytes = encode_raw(args.status_topic, callback)
    except Exception as e:
        sys.exit(f"produce.py: cannot encode the records: {e}")

    producer = Producer({"bootstrap.servers": args.brokers, "message.timeout.ms": 30000})
    reports = [None, None]  # (error, message) per record, in the order produced

    def on_delivery(i):
        return lambda err, msg: reports.__setitem__(i, (err, msg))

    producer.produce(args.users_topic, key=args.phone.encode(), value=user_bytes, on_delivery=on_delivery(0))
    # The bridge's header: the engine measures end-to-end latency from it.
    producer.produce(args.status_topic, key=sid.encode(), value=callback_bytes,
                     headers=[("ese.received-at", str(now).encode())], on_delivery=on_delivery(1))
    if producer.flush(40) > 0 or None in reports:
        sys.exit("produce.py: the broker did not acknowledge every record within 40 s")
    failed = False
    for err, msg in reports:
        if err is not None:
            print(f"produce.py: {msg.topic()}: {err}", file=sys.stderr)
            failed = True
        else:
            print(f"topic={msg.topic()} partition={msg.partition()} offset={msg.offset()}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
