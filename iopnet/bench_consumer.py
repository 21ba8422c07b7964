"""`iopnet bench-consumer`: the consumer's throughput against a raw baseline, same run.

On a private nats-server and a SQLite file in a temp dir, N PatientEnrolled events are
stored in IOP_INTAKE, then drained twice, each time by a fresh durable:
- raw: a hand-written nats-py durable pull consumer, one transaction per batch, asking
  the inbox about each event and writing its row and one effect row, acking after commit
  (what the consumer before FastStream did): the yardstick the issue compares against;
- raw, batched inbox: the same, but asking the inbox once per batch and writing its rows
  in one statement, as `Inbox.seen`/`Inbox.record` do: the same database work as iopnet,
  so iopnet/this is what the framework and our consumer's care cost;
- iopnet: `shared.messaging.Consumer` with a handler that writes the same effect row.
The figure that matters is the ratio iopnet/raw, measured in the same process on the same
machine a moment apart: this machine is shared and noisy, absolute numbers are not.
Each is run `rounds` times, alternating, and the best round of each is kept.
"""

import asyncio
import json
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import Column, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iopnet.natsd import NatsServer, free_port
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import PatientEnrolled
from shared.db import create_engine, session_factory
from shared.messaging import Consumer, Inbox, Subscription
from shared.messaging.broker import close, new_broker
from shared.messaging.streams import STREAMS, ensure_streams

BATCH = 64


def _event() -> Envelope:
    event = PatientEnrolled(
        patient_id=uuid4(),
        enrollment_id=uuid4(),
        program_id="adult-iop-am",
        level_of_care="2.1",
        cohort="adult",
        start_date=date(2026, 12, 1),
        referral_source="self",
    )
    return new_envelope(event, site_id="columbus-east")


class _Effects:
    def __init__(self, metadata: MetaData) -> None:
        self.table = Table("effects", metadata, Column("enrollment_id", String(36), primary_key=True))

    async def apply(self, session: AsyncSession, envelope: Envelope, event: Any) -> None:
        await session.execute(insert(self.table).values(enrollment_id=str(event.enrollment_id)))


async def _publish(url: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"], STREAMS["IOP_DLQ"]], 120)
        futures = []
        for _ in range(count):
            envelope = _event()
            futures.append(
                await js.publish_async(
                    envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)}
                )
            )
        await asyncio.gather(*futures)
    finally:
        await nc.close()


async def _fresh_db(path: Path) -> tuple[Any, async_sessionmaker[AsyncSession], Inbox, _Effects]:
    path.unlink(missing_ok=True)  # noqa: ASYNC240 - a benchmark between rounds
    metadata = MetaData()
    inbox, effects = Inbox(metadata), _Effects(metadata)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    return engine, session_factory(engine), inbox, effects


async def _raw(url: str, db: Path, count: int, durable: str, batched_inbox: bool = False) -> float:
    engine, sessions, inbox, effects = await _fresh_db(db)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            name=durable, durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL
        )
        await js.add_consumer("IOP_INTAKE", config)
        sub = await js.pull_subscribe_bind(durable=durable, stream="IOP_INTAKE")
        started, done = time.perf_counter(), 0
        while done < count:
            messages = await sub.fetch(BATCH, timeout=5)
            envelopes = [Envelope.from_bytes(message.data) for message in messages]
            async with sessions() as session, session.begin():
                if batched_inbox:
                    await _apply_batched(session, inbox, effects, envelopes, durable)
                else:
                    for envelope in envelopes:
                        if await inbox.claim(session, envelope, durable):
                            await effects.apply(session, envelope, envelope.event())
            for message in messages:
                await message.ack()
            done += len(messages)
        return count / (time.perf_counter() - started)
    finally:
        await nc.close()
        await engine.dispose()


async def _apply_batched(
    session: AsyncSession, inbox: Inbox, effects: _Effects, envelopes: list[Envelope], durable: str
) -> None:
    """The inbox asked once for the batch and its rows written in one statement."""
    seen = await inbox.seen(session, envelopes)
    rows = []
    for envelope in envelopes:
        if str(envelope.event_id) not in seen:
            await effects.apply(session, envelope, envelope.event())
            rows.append(inbox.row(envelope, durable))
    await inbox.record(session, rows)


async def _iopnet(url: str, db: Path, count: int, service: str) -> float:
    engine, sessions, inbox, effects = await _fresh_db(db)
    broker = new_broker(url, f"bench-{service}")
    await broker.connect()
    consumer = Consumer(
        service,
        Subscription("IOP_INTAKE", {PatientEnrolled: effects.apply}),
        sessions,
        inbox,
        broker,
        batch=BATCH,
    )
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    try:
        while consumer.stats.applied < count:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)  # a benchmark's own progress poll, not a test's wait
        return count / (time.perf_counter() - started)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close(broker)
        await engine.dispose()


async def run(messages: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iopnet-bench-consumer-") as tmp:
        server = NatsServer(Path(tmp) / "nats", port=free_port()).start()
        try:
            await _publish(server.url, messages)
            raw: list[float] = []
            batched: list[float] = []
            ours: list[float] = []
            for round_ in range(rounds):
                raw.append(await _raw(server.url, Path(tmp) / "raw.db", messages, f"raw-{round_}"))
                rawb = Path(tmp) / "rawb.db"
                batched.append(await _raw(server.url, rawb, messages, f"rawb-{round_}", batched_inbox=True))
                ours.append(await _iopnet(server.url, Path(tmp) / "iopnet.db", messages, f"iopnet{round_}"))
        finally:
            server.stop()
    best_raw, best_batched, best_ours = max(raw), max(batched), max(ours)
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "messages": messages,
        "batch": BATCH,
        "rounds": rounds,
        "raw_msgs_per_s": [round(r) for r in raw],
        "raw_batched_inbox_msgs_per_s": [round(r) for r in batched],
        "iopnet_msgs_per_s": [round(r) for r in ours],
        "best_raw_msgs_per_s": round(best_raw),
        "best_raw_batched_inbox_msgs_per_s": round(best_batched),
        "best_iopnet_msgs_per_s": round(best_ours),
        "ratio_iopnet_to_raw": round(best_ours / best_raw, 3),
        "ratio_iopnet_to_raw_batched_inbox": round(best_ours / best_batched, 3),
    }


def main(messages: int = 5000, rounds: int = 3) -> None:
    print(json.dumps(asyncio.run(run(messages, rounds)), indent=2))
