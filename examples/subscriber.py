"""Read iopnet's events as an integration, with plain nats-py (docs/events.md).

Durable: one JetStream durable per stream and site (basis qsoa) or one on your feed
(basis consent), named as iopnet named them for you; after a restart it goes on where it
stopped. Idempotent: an event's `event_id` is stored in the same SQLite transaction as its
effect (here: the event itself, in table `events`), and the message is acked only after
that commit, so a redelivered event is skipped, never processed twice.

    NATS_URL=nats://127.0.0.1:4223 NATS_PASSWORD=... \\
        python examples/subscriber.py --integration acme-ehr --site columbus-east --basis qsoa

`--since 2025-03-01T00:00:00Z` replays: the durables are deleted and created again from
that time (the events you have already stored are skipped, by event_id).
Stops on Ctrl-C or SIGTERM."""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from datetime import datetime

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

PUBLIC_STREAMS = {"IOP_INTAKE": "intake", "IOP_SCHEDULING": "scheduling", "IOP_NOTIFICATIONS": "notifications"}


def durables(integration: str, site: str, basis: str) -> list[tuple[str, str, str]]:
    """(stream, durable, filter subject): what `iopnet integrations add` printed."""
    if basis == "consent":
        return [("IOP_FEED", f"{integration}-IOP_FEED", f"iop.feed.{integration}.>")]
    return [(stream, f"{integration}-{stream}-{site}", f"iop.{p}.*.{site}") for stream, p in PUBLIC_STREAMS.items()]


def open_store(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, event_type TEXT, site_id TEXT,"
        " occurred_at TEXT, subject TEXT, body TEXT)"
    )
    return db


def process(db: sqlite3.Connection, subject: str, body: bytes) -> bool:
    """Your work goes here, in the same transaction as the event_id. False: seen before."""
    envelope = json.loads(body)
    with db:  # one transaction: commit on success, roll back on error
        cursor = db.execute(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?)",
            (
                envelope["event_id"],
                envelope["event_type"],
                envelope["site_id"],
                envelope["occurred_at"],
                subject,
                body.decode(),
            ),
        )
    return cursor.rowcount == 1


async def bind(
    js: JetStreamContext, stream: str, durable: str, subject: str, since: datetime | None, ack_wait: float
) -> JetStreamContext.PullSubscription:
    if since is not None:  # replay: start the durable again from that time
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
    try:
        await js.consumer_info(stream, durable)  # exists: go on where it stopped
    except NotFoundError:
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=subject,  # exactly one: the broker checks it
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
            opt_start_time=since,
        )
        await js.add_consumer(stream, config)
    return await js.pull_subscribe_bind(durable, stream=stream)


async def consume(sub: JetStreamContext.PullSubscription, db: sqlite3.Connection, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            messages = await sub.fetch(64, timeout=1)
        except TimeoutError:
            # Nothing came within the second. nats-py raises its own TimeoutError, or a
            # plain asyncio one when the deadline runs out between its two pull requests:
            # the built-in TimeoutError is the base of both.
            continue
        for msg in messages:
            event = json.loads(msg.data)
            fresh = process(db, msg.subject, msg.data)
            print("processed" if fresh else "duplicate", event["event_id"], event["event_type"], flush=True)
            await msg.ack()  # only after the commit: a crash before it means a redelivery


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4223"))
    parser.add_argument("--integration", default=os.environ.get("INTEGRATION_ID"))
    parser.add_argument("--site", default=os.environ.get("SITE_ID"))
    parser.add_argument("--basis", choices=("qsoa", "consent"), default=os.environ.get("BASIS", "qsoa"))
    parser.add_argument("--store", default=os.environ.get("STORE", "events.sqlite3"), help="SQLite file")
    parser.add_argument("--since", type=datetime.fromisoformat, help="replay from this time (RFC 3339)")
    parser.add_argument("--ack-wait", type=float, default=30.0, help="seconds before an unacked event comes again")
    args = parser.parse_args()
    if not args.integration or (args.basis == "qsoa" and not args.site):
        parser.error("--integration (and --site for basis qsoa) are required")

    user = f"integration-{args.integration}"
    nc = await nats.connect(
        args.url,
        user=os.environ.get("NATS_USER", user),
        password=os.environ["NATS_PASSWORD"],  # never on the command line
        inbox_prefix=f"_INBOX.{user}",  # the only inbox the broker lets you use
    )
    js = nc.jetstream()
    db = open_store(args.store)
    mine = durables(args.integration, args.site, args.basis)
    subs = [await bind(js, stream, durable, subject, args.since, args.ack_wait) for stream, durable, subject in mine]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("ready:", ", ".join(durable for _, durable, _ in mine), flush=True)
    try:
        await asyncio.gather(*(consume(sub, db, stop) for sub in subs))
    finally:
        await nc.flush()  # the last acks out, then close (drain would wait on the pull subscriptions)
        await nc.close()
        db.close()


if __name__ == "__main__":
    asyncio.run(main())
