"""A consumer that stops hands back what it holds, at once and in order.

Against a real nats-server and database: a stop mid-work lets the message in hand
finish, takes nothing new, and NAKs the rest oldest first, so the next consumer on the
durable gets them immediately (not after ack_wait, behind later messages). A service
stopped mid-backlog (the runtime's stop, as on SIGTERM) does the same."""

import asyncio
import time
from pathlib import Path

import nats
from sqlalchemy.ext.asyncio import AsyncSession

from iopnet.testing import eventually
from services.scheduling import store as scheduling_store
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import Event, SiteRegistered
from shared.messaging import Consumer, Subscription
from shared.messaging.broker import close, jetstream
from shared.messaging.consumer import Handler
from shared.runtime import ServiceRuntime
from tests.conftest import applied_in_order, connected_broker, make_settings, publish

# Long on purpose: a message that came back only when its lease ran out would miss
# every deadline below.
ACK_WAIT = 30.0


def site(index: int) -> Envelope:
    return new_envelope(SiteRegistered(name=f"Site {index:03d}", timezone="America/Chicago"), site_id=f"s-{index:03d}")


async def stream_order(nats_url: str) -> dict[str, int]:
    """event_id -> sequence in IOP_INTAKE."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info("IOP_INTAKE")).state
        order = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            message = await js.get_msg("IOP_INTAKE", seq)
            order[str(Envelope.from_bytes(message.data or b"").event_id)] = seq
        return order
    finally:
        await nc.close()


async def test_a_stop_finishes_the_message_in_hand_and_returns_the_rest_at_once_in_order(nats_server, inbox_db) -> None:
    inbox, sessions = inbox_db
    events = [site(i) for i in range(20)]
    ids = [str(e.event_id) for e in events]
    tries: dict[str, int] = {}
    first: Consumer | None = None

    async def handler(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        assert isinstance(event, SiteRegistered)
        tries[event.name] = tries.get(event.name, 0) + 1
        if event.name == "Site 002" and tries[event.name] == 1:
            raise RuntimeError("fails once: the batch is replayed one message at a time")
        if event.name == "Site 003" and first is not None:
            first.request_stop()  # a SIGTERM arrives while this message is being applied

    await publish(nats_server.url, *events)  # a backlog before the start
    broker = await connected_broker(nats_server.url)
    subscription = Subscription("IOP_INTAKE", {SiteRegistered: handler})
    try:
        first = Consumer("probe", subscription, sessions, inbox, broker, ack_wait_seconds=ACK_WAIT)
        async with asyncio.timeout(10):
            await first.run()  # returns by itself once stopped
        # Site 000 alone, then the batch 001-019 failed at 002 and was replayed one by
        # one until the stop during 003: 003 finished, 004-019 were handed back.
        assert await applied_in_order(sessions, inbox) == ids[:4]
        assert first.stats.returned == 16

        second = Consumer("probe", subscription, sessions, inbox, broker, ack_wait_seconds=ACK_WAIT)
        task = asyncio.create_task(second.run())
        try:

            async def all_applied() -> bool:
                return len(await applied_in_order(sessions, inbox)) == 20

            await eventually(all_applied, timeout=5, what="the handed-back messages, well before ack_wait")
        finally:
            second.request_stop()
            await task
    finally:
        await close(broker)
    assert await applied_in_order(sessions, inbox) == ids  # each once, in stream order
    assert second.stats.recovered == 16


async def test_an_idle_consumer_stops_at_once_and_leaves_nothing_pending(nats_server, inbox_db) -> None:
    inbox, sessions = inbox_db
    events = [site(0), site(1)]

    async def handler(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        return None

    broker = await connected_broker(nats_server.url)
    subscription = Subscription("IOP_INTAKE", {SiteRegistered: handler})
    try:
        await publish(nats_server.url, events[0])
        consumer = Consumer("probe", subscription, sessions, inbox, broker, idle_wait_seconds=30)
        task = asyncio.create_task(consumer.run())

        async def applied_first() -> bool:
            return len(await applied_in_order(sessions, inbox)) == 1

        await eventually(applied_first, what="the first message")
        stop_requested = time.monotonic()
        consumer.request_stop()
        async with asyncio.timeout(5):
            await task  # not after the 30 s idle fetch
        assert time.monotonic() - stop_requested < 2

        # The stopped consumer's pull request may still wait on the server; a message
        # published now must not be delivered into it (and lost until ack_wait).
        await publish(nats_server.url, events[1])

        async def counted():  # the server counts a stored message for its consumers a moment later
            info = await jetstream(broker).consumer_info("IOP_INTAKE", "probe-IOP_INTAKE")
            return info if info.num_pending + info.num_ack_pending >= 1 else None

        info = await eventually(counted, what="the consumer to count the new message")
        assert info.num_ack_pending == 0 and info.num_pending == 1
        again = Consumer("probe", subscription, sessions, inbox, broker, ack_wait_seconds=ACK_WAIT)
        task = asyncio.create_task(again.run())
        try:

            async def both() -> bool:
                return len(await applied_in_order(sessions, inbox)) == 2

            await eventually(both, timeout=5, what="the message published after the stop")
        finally:
            again.request_stop()
            await task
    finally:
        await close(broker)
    assert await applied_in_order(sessions, inbox) == [str(e.event_id) for e in events]


async def test_a_service_stopped_mid_backlog_hands_it_back_in_order(
    nats_server, database_url: str, tmp_path: Path
) -> None:
    """runtime.stop(), as on SIGTERM, while a consumer works through a backlog: the
    batch in hand finishes, and the restarted service applies the rest at once (not
    after ack_wait), each event once and in stream order."""
    count = 200
    await publish(nats_server.url, *(site(i) for i in range(count)))
    settings = make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url, ack_wait_seconds=ACK_WAIT)
    inbox = scheduling_store.inbox

    def service(handler: Handler) -> ServiceRuntime:
        return ServiceRuntime(
            "scheduling",
            settings,
            outbox=scheduling_store.outbox,
            inbox=inbox,
            migrations_dir=scheduling_store.MIGRATIONS,
            subscriptions=[Subscription("IOP_INTAKE", {SiteRegistered: handler})],
        )

    async def held_until_the_stop(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        assert isinstance(event, SiteRegistered)
        if event.name == "Site 010":
            in_hand.set()
            await first.stopping.wait()  # the SIGTERM comes while this batch is at work

    in_hand = asyncio.Event()
    first = service(held_until_the_stop)
    await first.start()
    try:

        async def at_work() -> bool:
            return in_hand.is_set()

        # A batch at work (the one that holds Site 010), not just the first message.
        await eventually(at_work, what="the consumer to start on the backlog")
    finally:
        await first.stop()
    # The batch in hand finished (committed and acked, not cancelled); nothing after it
    # was taken.
    assert 10 < first.consumers[0].stats.applied < count

    async def plain(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        return None

    again = service(plain)
    await again.start()
    try:

        async def all_applied() -> list[str] | None:
            found = await applied_in_order(again.sessions, inbox)
            return found if len(found) == count else None

        applied = await eventually(all_applied, timeout=20, what="the whole backlog, well before ack_wait")
    finally:
        await again.stop()
    order = await stream_order(nats_server.url)
    assert applied is not None
    assert [order[event_id] for event_id in applied] == sorted(order.values())
