"""Broker-enforced access (DESIGN A4), on the nats-server configuration `iopnet run` gives
its embedded server and deploy/nats.conf carries: every user has an allow-list; the
contact details live in an account of their own (RESTRICTED) that only intake (publish)
and notifications (consume) have users in; only a producer publishes its own subjects;
only a stream's owner changes it, and nobody purges or deletes one; a dead-letter retry
reaches only the consumer that dead-lettered the message and applies the stored original.

What a denial looks like to nats-py 2.16 against nats-server 2.15: the server drops the
denied publish (a JetStream API call is a publish to `$JS.API.…`) and sends the client
`-ERR 'Permissions Violation for Publish to "<subject>"'`, which nats-py hands to
`error_cb` as a `nats.errors.Error` whose text is lowercased; the request itself gets no
reply and raises `nats.errors.TimeoutError` at its timeout. A denied subscription is
reported the same way (`permissions violation for subscription to "<subject>"`) and
delivers nothing. Every wait here is on one of those events, with a deadline.
"""

import asyncio
import json
import os
import stat
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from sqlalchemy import delete, func, select

from iopnet.dlq import RetryRefused, list_dead_letters, retry_dead_letter
from iopnet.natsd import (
    CONSUMES,
    CREDENTIALS_FILE,
    OWNS,
    PASSWORD_ENV,
    PERMISSIONS,
    RESTRICTED_USERS,
    USERS,
    NatsServer,
    accounts_block,
    durables,
    free_port,
    load_or_create_credentials,
    nats_server_binary,
    ops_url,
)
from iopnet.testing import eventually
from services.console.live import ALERT_SUBJECT, AlertFeed
from services.intake.handlers import SUBSCRIPTIONS as INTAKE_SUBSCRIPTIONS
from services.notifications.handlers import SUBSCRIPTIONS as NOTIFICATIONS_SUBSCRIPTIONS
from services.scheduling import store as scheduling_store
from services.scheduling.app import create_app as create_scheduling
from services.scheduling.handlers import SUBSCRIPTIONS as SCHEDULING_SUBSCRIPTIONS
from shared.contracts import dlq_subject, new_envelope
from shared.contracts.events import CareTeamAlerted, PatientContactChanged, PatientEnrolled, SiteRegistered
from shared.messaging.connection import connect_once
from shared.messaging.control import control_subject
from shared.messaging.streams import STREAMS, ensure_streams, owned_streams, stream_for_subject
from tests.conftest import make_settings, running

REPO = Path(__file__).resolve().parents[2]
SITE = "columbus-east"
PHONE = "+13805550123"
DENIED_TIMEOUT = 1.0  # a denied request never gets a reply: it can only time out
INTAKE_R, NOTIFICATIONS_R = RESTRICTED_USERS["intake"], RESTRICTED_USERS["notifications"]
# Everyone but the one reader of contact details.
NOT_THE_READER = [user for user in USERS if user != NOTIFICATIONS_R]
DURABLE = "notifications-IOP_RESTRICTED"
PUBLIC_STREAMS = [name for name, spec in STREAMS.items() if not spec.restricted]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats_dir = tmp_path / "nats"
    server = NatsServer(nats_dir, port=free_port(), users=load_or_create_credentials(nats_dir)).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@dataclass
class User:
    """One nats-py connection as one NATS user, with the violations the server reported."""

    name: str
    nc: Client
    violations: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    async def reported(self, action: str, subject: str, timeout: float = 5.0) -> None:
        """Wait until the server reported `permissions violation for <action> to "<subject>"`."""
        expected = f'permissions violation for {action} to "{subject}"'.lower()
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: any(expected in v for v in self.violations))
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {expected!r} in {timeout}s; got {self.violations}") from None

    async def denied(self, request: Awaitable[Any], subject: str) -> None:
        """`request` (a JetStream call or a request to `subject`) gets no reply, and the
        server says why."""
        with pytest.raises(nats.errors.TimeoutError):
            await request
        await self.reported("publish", subject)

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> Any:
        return await self.nc.request(subject, json.dumps(body or {}).encode(), timeout=DENIED_TIMEOUT)


@asynccontextmanager
async def connected(server: NatsServer, name: str) -> AsyncIterator[User]:
    violations: list[str] = []
    changed = asyncio.Condition()

    async def on_error(exc: Exception) -> None:
        async with changed:
            violations.append(str(exc).lower())
            changed.notify_all()

    # connect_once: the user's own inbox prefix, the only one it may subscribe to.
    nc = await connect_once(server.user_url(name), error_cb=on_error, allow_reconnect=False)
    try:
        yield User(name, nc, violations, changed)
    finally:
        await nc.close()


def contact_changed() -> Any:
    event = PatientContactChanged(
        patient_id=uuid4(), phone=PHONE, email="pat@example.org", preferred_channel="sms", language="en"
    )
    return new_envelope(event, site_id=SITE)


def enrolled() -> Any:
    event = PatientEnrolled(
        patient_id=uuid4(),
        enrollment_id=uuid4(),
        program_id="adult-evening",
        level_of_care="2.1",
        cohort="adult",
        start_date=datetime.now(UTC).date(),
        referral_source="self",
    )
    return new_envelope(event, site_id=SITE)


async def declare_streams(server: NatsServer) -> None:
    """What the services' runtimes do at start, each as its own user."""
    for owner in OWNS:
        async with connected(server, owner) as user:
            await ensure_streams(user.js, [s for s in owned_streams(owner) if not s.restricted], 120, service=owner)
    async with connected(server, NOTIFICATIONS_R) as user:
        await ensure_streams(user.js, [STREAMS["IOP_RESTRICTED"]], 120, service="notifications")


async def publish_as_intake(server: NatsServer, *envelopes: Any) -> None:
    """What intake's relay does: public events on its main connection, contact details on
    its restricted one, each with Nats-Msg-Id."""
    for envelope in envelopes:
        restricted = envelope.subject.startswith("iop.restricted.")
        async with connected(server, INTAKE_R if restricted else "intake") as intake:
            specs = [s for s in owned_streams("intake") if s.restricted == restricted]
            await ensure_streams(intake.js, specs, 120, service="intake")
            ack = await intake.js.publish(
                envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)}
            )
            assert ack.stream == ("IOP_RESTRICTED" if restricted else "IOP_INTAKE")
            assert not intake.violations


def notifications_consumer_config() -> ConsumerConfig:
    """The durable notifications' Consumer._bind creates on IOP_RESTRICTED."""
    [subscription] = [s for s in NOTIFICATIONS_SUBSCRIPTIONS if s.stream == "IOP_RESTRICTED"]
    return ConsumerConfig(
        name=DURABLE,
        durable_name=DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subjects=subscription.filter_subjects(),
    )


async def test_the_server_requires_a_user_and_its_password(server: NatsServer) -> None:
    for url in (server.url, server.user_url("ops").replace("ops:", "ops:wrong")):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


def test_the_permission_tables_match_what_the_services_do() -> None:
    """natsd's allow-lists are written from CONSUMES and OWNS; those must be what the
    services really consume and declare, or a service would be refused at start."""
    subscriptions = {
        "intake": INTAKE_SUBSCRIPTIONS,
        "scheduling": SCHEDULING_SUBSCRIPTIONS,
        "notifications": NOTIFICATIONS_SUBSCRIPTIONS,
    }
    consumed = {service: {s.stream for s in subs} for service, subs in subscriptions.items()}
    assert consumed == {service: set(streams) for service, streams in CONSUMES.items()}
    for service, subs in subscriptions.items():
        declared = {durable for stream in CONSUMES[service] for durable in durables(service, stream)}
        assert {s.durable(service) for s in subs} == declared
    for service in OWNS:
        owned = {s.name for s in STREAMS.values() if s.owner == service and not s.restricted}
        assert owned == set(OWNS[service])
    assert STREAMS["IOP_RESTRICTED"].owner == "notifications"
    assert STREAMS["IOP_RESTRICTED"].creators == ("intake",)


async def test_contact_details_flow_from_intake_to_notifications_in_their_own_account(server: NatsServer) -> None:
    envelope = contact_changed()
    await publish_as_intake(server, envelope)  # intake creates the stream if it is missing
    await declare_streams(server)  # notifications, the owner, brings it to its config
    async with connected(server, NOTIFICATIONS_R) as notifications:
        await notifications.js.add_consumer("IOP_RESTRICTED", notifications_consumer_config())
        pull = await notifications.js.pull_subscribe_bind(durable=DURABLE, stream="IOP_RESTRICTED")
        [message] = await pull.fetch(1, timeout=5)
        await message.ack_sync()
        assert message.subject == envelope.subject
        assert json.loads(message.data)["data"]["phone"] == PHONE
        # A dead letter's retry re-reads the original by sequence.
        assert (await notifications.js.get_msg("IOP_RESTRICTED", 1)).subject == envelope.subject
        assert not notifications.violations
    # In the main account there is no such stream at all.
    async with connected(server, "ops") as ops:
        with pytest.raises(NotFoundError):
            await ops.js.stream_info("IOP_RESTRICTED")


@pytest.mark.parametrize("name", NOT_THE_READER)
async def test_no_side_door_to_the_contact_details(server: NatsServer, name: str) -> None:
    """Every way to read IOP_RESTRICTED, copy it, divert it, change it or empty it, tried
    as each user but the one reader, is refused by the broker, and none of it touched
    the stream or notifications' place in it."""
    envelope = contact_changed()
    await declare_streams(server)
    await publish_as_intake(server, envelope)
    async with connected(server, NOTIFICATIONS_R) as notifications:
        await notifications.js.add_consumer("IOP_RESTRICTED", notifications_consumer_config())
        config_before = (await notifications.js.stream_info("IOP_RESTRICTED")).config

    async with connected(server, name) as user:
        js, inbox = user.nc.jetstream(timeout=DENIED_TIMEOUT), user.nc.new_inbox()
        snapshot = {"deliver_subject": inbox, "chunk_size": 1024}
        legacy = {"stream_name": "IOP_RESTRICTED", "config": {"durable_name": "peek"}}
        republish = {
            "name": "IOP_RESTRICTED",
            "subjects": ["iop.restricted.>"],
            "storage": "file",
            "republish": {"src": "iop.restricted.>", "dest": "probe.leak.>"},
        }
        copies = {
            "COPY": {"name": "COPY", "mirror": {"name": "IOP_RESTRICTED"}, "storage": "memory"},
            "SOURCED": {"name": "SOURCED", "sources": [{"name": "IOP_RESTRICTED"}], "storage": "memory"},
        }
        attempts: dict[str, Awaitable[Any]] = {
            # a consumer of its own: named (how Consumer._bind does it), ephemeral, legacy durable
            f"$JS.API.CONSUMER.CREATE.IOP_RESTRICTED.{DURABLE}": js.add_consumer(
                "IOP_RESTRICTED", notifications_consumer_config(), timeout=DENIED_TIMEOUT
            ),
            "$JS.API.CONSUMER.CREATE.IOP_RESTRICTED": js.add_consumer(
                "IOP_RESTRICTED", ConsumerConfig(ack_policy=AckPolicy.EXPLICIT), timeout=DENIED_TIMEOUT
            ),
            "$JS.API.CONSUMER.DURABLE.CREATE.IOP_RESTRICTED.peek": user.api(
                "$JS.API.CONSUMER.DURABLE.CREATE.IOP_RESTRICTED.peek", legacy
            ),
            # pulling from notifications' durable
            f"$JS.API.CONSUMER.MSG.NEXT.IOP_RESTRICTED.{DURABLE}": user.api(
                f"$JS.API.CONSUMER.MSG.NEXT.IOP_RESTRICTED.{DURABLE}", {"batch": 1}
            ),
            # reading messages by sequence or by subject, through the API and directly
            "$JS.API.STREAM.MSG.GET.IOP_RESTRICTED": js.get_msg("IOP_RESTRICTED", 1),
            "$JS.API.DIRECT.GET.IOP_RESTRICTED": js.get_msg("IOP_RESTRICTED", 1, direct=True),
            f"$JS.API.DIRECT.GET.IOP_RESTRICTED.{envelope.subject}": js.get_msg(
                "IOP_RESTRICTED", subject=envelope.subject, direct=True
            ),
            # a snapshot would stream the whole store to the caller
            "$JS.API.STREAM.SNAPSHOT.IOP_RESTRICTED": user.api("$JS.API.STREAM.SNAPSHOT.IOP_RESTRICTED", snapshot),
            # copies: a mirror or a source, and a republish of every new message
            **{
                f"$JS.API.STREAM.CREATE.{copy}": user.api(f"$JS.API.STREAM.CREATE.{copy}", c)
                for copy, c in copies.items()
            },
            "$JS.API.STREAM.UPDATE.IOP_RESTRICTED": user.api("$JS.API.STREAM.UPDATE.IOP_RESTRICTED", republish),
            # emptying it
            "$JS.API.STREAM.PURGE.IOP_RESTRICTED": user.api("$JS.API.STREAM.PURGE.IOP_RESTRICTED"),
            "$JS.API.STREAM.DELETE.IOP_RESTRICTED": user.api("$JS.API.STREAM.DELETE.IOP_RESTRICTED"),
            "$JS.API.STREAM.MSG.DELETE.IOP_RESTRICTED": user.api(
                "$JS.API.STREAM.MSG.DELETE.IOP_RESTRICTED", {"seq": 1}
            ),
        }
        await asyncio.gather(*(user.denied(request, subject) for subject, request in attempts.items()))

        # Acks on notifications' consumer (an ack with +NXT would pull the next message).
        await user.nc.publish(f"$JS.ACK.IOP_RESTRICTED.{DURABLE}.1.1.1.0.0", b"+NXT", reply=inbox)
        await user.reported("publish", f"$JS.ACK.IOP_RESTRICTED.{DURABLE}.1.1.1.0.0")
        # Core subscriptions: the subjects themselves, everything, anyone's inbox.
        for pattern in ("iop.restricted.>", ">", "_INBOX.>", "probe.leak.>"):
            await user.nc.subscribe(pattern)
            await user.reported("subscription", pattern)

    # Nothing changed: the one message, the stream's config, notifications' place in it.
    async with connected(server, NOTIFICATIONS_R) as notifications:
        info = await notifications.js.stream_info("IOP_RESTRICTED")
        assert info.state.messages == 1
        assert info.config.republish is None and info.config.subjects == config_before.subjects
        pull = await notifications.js.pull_subscribe_bind(durable=DURABLE, stream="IOP_RESTRICTED")
        [message] = await pull.fetch(1, timeout=5)
        assert message.subject == envelope.subject
        assert message.metadata.num_delivered == 1
    async with connected(server, "ops") as ops:
        for copy in ("COPY", "SOURCED"):
            with pytest.raises(NotFoundError):
                await ops.js.stream_info(copy)


MAIN_USERS = [user for user in USERS if PERMISSIONS[user].account == "IOP"]


@pytest.mark.parametrize("name", MAIN_USERS)
async def test_only_a_streams_owner_changes_it_and_nobody_empties_it(server: NatsServer, name: str) -> None:
    await declare_streams(server)
    await publish_as_intake(server, enrolled())
    async with connected(server, name) as user:
        rogue = {"name": "ROGUE", "subjects": ["rogue.>"], "storage": "memory"}
        attempts: dict[str, Awaitable[Any]] = {
            "$JS.API.STREAM.CREATE.ROGUE": user.api("$JS.API.STREAM.CREATE.ROGUE", rogue)
        }
        for stream in PUBLIC_STREAMS:
            for operation in ("PURGE", "DELETE"):
                if (name, stream, operation) == ("ops", "IOP_DLQ", "PURGE"):
                    continue  # `iopnet dlq purge`: dead letters only (tests/integration/test_dlq_ops.py)
                subject = f"$JS.API.STREAM.{operation}.{stream}"
                attempts[subject] = user.api(subject)
            if stream not in OWNS.get(name, ()):
                config = {"name": stream, "subjects": list(STREAMS[stream].subjects), "storage": "file"}
                config["republish"] = {"src": ">", "dest": "probe.leak.>"}
                attempts[f"$JS.API.STREAM.UPDATE.{stream}"] = user.api(f"$JS.API.STREAM.UPDATE.{stream}", config)
        await asyncio.gather(*(user.denied(request, subject) for subject, request in attempts.items()))
    async with connected(server, "ops") as ops:
        assert (await ops.js.stream_info("IOP_INTAKE")).state.messages == 1
        for stream in PUBLIC_STREAMS:
            assert (await ops.js.stream_info(stream)).config.republish is None


PUBLISH_RULES = [
    # (user, subject, allowed)
    ("intake", "iop.intake.patient_enrolled.site-a", True),
    ("intake", "iop.restricted.intake.patient_contact_changed.site-a", False),  # only on its restricted user
    ("intake", "iop.scheduling.session_scheduled.site-a", False),
    ("intake", "iop.notifications.notification_sent.site-a", False),
    ("scheduling", "iop.scheduling.session_scheduled.site-a", True),
    ("scheduling", "iop.intake.patient_enrolled.site-a", False),
    ("scheduling", "iop.notifications.notification_sent.site-a", False),
    ("scheduling", "iop.restricted.intake.x.site", False),
    ("notifications", "iop.notifications.notification_sent.site-a", True),
    ("notifications", "iop.intake.patient_enrolled.site-a", False),
    ("notifications", "iop.scheduling.session_scheduled.site-a", False),
    ("notifications", "iop.restricted.intake.patient_contact_changed.site-a", False),
    # ops publishes no event at all: a dead-letter retry is the consumer's own doing.
    ("ops", "iop.intake.patient_enrolled.site-a", False),
    ("ops", "iop.scheduling.session_scheduled.site-a", False),
    ("ops", "iop.notifications.notification_sent.site-a", False),
    ("ops", "iop.dlq.scheduling.patient_enrolled.site-a", False),
    # Each consumer dead-letters under its own name only: the subject says whose it is.
    *((name, f"iop.dlq.{name}.patient_enrolled.site-a", True) for name in ("intake", "scheduling", "notifications")),
    ("scheduling", "iop.dlq.notifications.patient_enrolled.site-a", False),
    ("notifications", "iop.dlq.intake.patient_enrolled.site-a", False),
    (INTAKE_R, "iop.restricted.intake.patient_contact_changed.site-a", True),
    (INTAKE_R, "iop.intake.patient_enrolled.site-a", False),
    (NOTIFICATIONS_R, "iop.restricted.intake.patient_contact_changed.site-a", False),
    # The console publishes nothing, not even the alert it listens to.
    ("console", "iop.notifications.care_team_alerted.site-a", False),
    ("console", "iop.intake.check_in_submitted.site-a", False),
]


async def test_each_user_publishes_only_its_own_subjects(server: NatsServer) -> None:
    await declare_streams(server)
    async with AsyncExitStack() as stack:
        users = {name: await stack.enter_async_context(connected(server, name)) for name in USERS}

        async def check(name: str, subject: str, allowed: bool) -> None:
            user = users[name]
            request = user.js.publish(subject, b"{}", timeout=DENIED_TIMEOUT)
            if allowed:
                assert (await request).stream == stream_for_subject(subject), (name, subject)
            else:
                await user.denied(request, subject)

        await asyncio.gather(*(check(*rule) for rule in PUBLISH_RULES))
    # Nothing denied was stored: one message per allowed publish, in its stream.
    async with connected(server, "ops") as ops:
        stored = {name: (await ops.js.stream_info(name)).state.messages for name in PUBLIC_STREAMS}
    async with connected(server, NOTIFICATIONS_R) as notifications:
        stored["IOP_RESTRICTED"] = (await notifications.js.stream_info("IOP_RESTRICTED")).state.messages
    expected = Counter(stream_for_subject(subject) for _, subject, allowed in PUBLISH_RULES if allowed)
    assert stored == {name: expected[name] for name in STREAMS}


def care_team_alerted() -> Any:
    event = CareTeamAlerted(
        alert_id=uuid4(), patient_id=uuid4(), reason="urgent_check_in", severity="urgent", cause_event_id=uuid4()
    )
    return new_envelope(event, site_id=SITE)


async def test_the_console_hears_care_team_alerts_and_nothing_else(server: NatsServer) -> None:
    """The console's user (iopnet run, compose, Kubernetes): a core subscription to
    CareTeamAlerted, as notifications' relay publishes it into IOP_NOTIFICATIONS; every
    other subject, the JetStream API and every publish refused."""
    assert PERMISSIONS["console"].subscribe == (ALERT_SUBJECT, "_INBOX.console.>")
    assert PERMISSIONS["console"].publish == () and not PERMISSIONS["console"].allow_responses
    await declare_streams(server)
    await publish_as_intake(server, enrolled(), contact_changed())
    async with connected(server, "console") as console, connected(server, "notifications") as notifications:
        heard: asyncio.Queue[Msg] = asyncio.Queue()
        await console.nc.subscribe(ALERT_SUBJECT, cb=heard.put)
        await console.nc.flush()  # the server has the subscription before the alert
        alert = care_team_alerted()
        ack = await notifications.js.publish(
            alert.subject, alert.to_bytes(), headers={"Nats-Msg-Id": str(alert.event_id)}
        )
        assert ack.stream == "IOP_NOTIFICATIONS"
        message = await asyncio.wait_for(heard.get(), timeout=5)
        assert message.subject == alert.subject == f"iop.notifications.care_team_alerted.{SITE}"
        assert json.loads(message.data)["event_id"] == str(alert.event_id)

        # Any other subject: the other producers', contact details, dead letters, the
        # JetStream API and its acks, anyone's inbox, everything.
        refused = (
            "iop.intake.>", "iop.scheduling.>", "iop.notifications.>", "iop.notifications.notification_sent.*",
            "iop.restricted.>", "iop.dlq.>", "iop.ctl.>", "$JS.API.>", "$JS.ACK.>", "_INBOX.>", ">",
        )  # fmt: skip
        for pattern in refused:
            await console.nc.subscribe(pattern)
            await console.reported("subscription", pattern)
        # No event, no JetStream call: not even reading a stream's state or a stored message.
        event = enrolled()
        await console.denied(console.js.publish(event.subject, event.to_bytes(), timeout=DENIED_TIMEOUT), event.subject)
        await console.nc.publish(alert.subject, alert.to_bytes())
        await console.reported("publish", alert.subject)
        js = console.nc.jetstream(timeout=DENIED_TIMEOUT)
        await console.denied(js.stream_info("IOP_INTAKE"), "$JS.API.STREAM.INFO.IOP_INTAKE")
        await console.denied(js.get_msg("IOP_NOTIFICATIONS", 1), "$JS.API.STREAM.MSG.GET.IOP_NOTIFICATIONS")
        await console.denied(console.api("$JS.API.INFO"), "$JS.API.INFO")
        consumer = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
        await console.denied(
            js.add_consumer("IOP_NOTIFICATIONS", consumer), "$JS.API.CONSUMER.CREATE.IOP_NOTIFICATIONS"
        )
        assert heard.empty(), "only the one alert, never its own publish"
    async with connected(server, "ops") as ops:
        assert (await ops.js.stream_info("IOP_NOTIFICATIONS")).state.messages == 1
        assert (await ops.js.stream_info("IOP_INTAKE")).state.messages == 1


async def test_the_console_alert_feed_connects_as_its_user(server: NatsServer) -> None:
    """services/console/live.py on the console's credentials: ready, and a new alert at a
    site reaches the browsers listening for it. The alert is published until one is heard:
    the feed's subscription reaches the server a moment after it starts."""
    feed = AlertFeed(server.user_url("console"))
    await feed.start()
    try:
        assert feed.connected
        await declare_streams(server)
        listener = feed.listen(frozenset({SITE}))
        first = asyncio.ensure_future(anext(listener))
        async with connected(server, "notifications") as notifications:

            async def heard() -> bool:
                alert = care_team_alerted()
                await notifications.js.publish(alert.subject, alert.to_bytes())
                return first.done()

            await eventually(heard, what="the console heard a CareTeamAlerted")
        assert first.result() == SITE
        await listener.aclose()
    finally:
        await feed.stop()


async def dead_letter_as(server: NatsServer, consumer: str, original: Any, sequence: int, **overrides: Any) -> None:
    """A dead letter as Consumer._dead_letter writes it (`overrides` forge it)."""
    async with connected(server, consumer) as user:
        headers = {
            "Iop-Dlq-Reason": "failed 3 times: HandlerError: test",
            "Iop-Consumer": f"{consumer}-IOP_INTAKE",
            "Iop-Original-Subject": original.subject,
            "Iop-Original-Stream": "IOP_INTAKE",
            "Iop-Original-Sequence": str(sequence),
            "Iop-Deliveries": "3",
            **overrides.pop("headers", {}),
        }
        payload = overrides.pop("payload", original.to_bytes())
        subject = dlq_subject(consumer, original.subject.split(".")[-2], SITE)
        await user.js.publish(subject, payload, headers=headers)
        assert not user.violations


async def test_a_dead_letter_retry_applies_the_stored_original_in_its_own_consumer_only(
    server: NatsServer, tmp_path: Path
) -> None:
    """Scheduling runs as its NATS user. A retry asks scheduling to re-read the original
    from IOP_INTAKE: a forged dead letter can neither make it apply another payload nor
    reach another service, and ops publishes nothing."""
    site = new_envelope(SiteRegistered(name="Columbus East", timezone="America/New_York"), site_id=SITE)
    lost, forged = enrolled(), enrolled()
    settings = make_settings(
        server.user_url("scheduling"), tmp_path, scheduling_database_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    )
    app = create_scheduling(settings)
    enrollments = scheduling_store.enrollments

    async def enrollment_ids() -> set[str]:
        async with app.state.runtime.sessions() as session:
            return {str(r) for r in (await session.execute(select(enrollments.c.enrollment_id))).scalars()}

    async with running(app):
        await declare_streams(server)
        await publish_as_intake(server, site, lost)  # IOP_INTAKE seq 1 and 2

        async def applied() -> bool:
            return str(lost.data["enrollment_id"]) in await enrollment_ids()

        await eventually(applied, what="scheduling applied the enrollment")
        # As if the handler had failed for good: the effect and the inbox row are gone.
        async with app.state.runtime.sessions() as session, session.begin():
            await session.execute(
                delete(enrollments).where(enrollments.c.enrollment_id == str(lost.data["enrollment_id"]))
            )
            inbox = scheduling_store.inbox.table
            await session.execute(delete(inbox).where(inbox.c.event_id == str(lost.event_id)))

        # 1: a real dead letter of scheduling's; 2: one whose payload is forged; 3: one that
        # names a stored event under another subject; 4: notifications' dead letter.
        await dead_letter_as(server, "scheduling", lost, 2)
        await dead_letter_as(server, "scheduling", lost, 2, payload=forged.to_bytes())
        await dead_letter_as(server, "scheduling", lost, 1)
        await dead_letter_as(server, "notifications", lost, 2)
        ops = server.user_url("ops")
        assert [letter["sequence"] for letter in await list_dead_letters(ops, 10)] == [1, 2, 3, 4]

        reply = await retry_dead_letter(ops, 1)
        assert (reply.service, reply.outcome) == ("scheduling", "applied")
        assert await applied()
        # The forged payload is never read: the stored original is, and it is applied already.
        assert (await retry_dead_letter(ops, 2)).outcome == "duplicate"
        assert str(forged.data["enrollment_id"]) not in await enrollment_ids()
        with pytest.raises(RetryRefused, match="does not match the dead letter"):
            await retry_dead_letter(ops, 3)
        # Notifications' dead letter goes to notifications (not running here), and
        # scheduling, asked directly, refuses it.
        with pytest.raises(RetryRefused, match="notifications service is not running"):
            await retry_dead_letter(ops, 4)
        async with connected(server, "ops") as user:
            request = json.dumps({"dlq_sequence": 4}).encode()
            answer = await user.nc.request(control_subject("scheduling", "dlq_retry"), request, timeout=10)
            assert json.loads(answer.data)["error"] == "not a dead letter of this service"
            # ops cannot speak for scheduling: control replies come from the service only.
            assert (await user.js.stream_info("IOP_INTAKE")).state.messages == 2  # nothing re-published
        async with app.state.runtime.sessions() as session:
            count = (await session.execute(select(func.count()).select_from(enrollments))).scalar_one()
        assert count == 1


def test_credentials_persist_across_restarts_and_gain_new_users(tmp_path: Path) -> None:
    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    # A file from before the restricted account and the console: its four passwords are
    # kept, the new users get one each.
    old = {user: f"old-{user}-password" for user in ("intake", "scheduling", "notifications", "ops")}
    (nats_dir / CREDENTIALS_FILE).write_text(json.dumps(old))
    first = load_or_create_credentials(nats_dir)
    assert set(first) == set(USERS) and "console" in first
    assert {user: first[user] for user in old} == old
    assert len(set(first.values())) == len(USERS)
    path = nats_dir / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    async def ops_can_connect(server: NatsServer, password: str) -> None:
        nc = await nats.connect(f"nats://ops:{password}@{server.host}:{server.port}", allow_reconnect=False)
        await nc.close()

    port = free_port()
    for _ in range(2):
        credentials = load_or_create_credentials(nats_dir)
        assert credentials == first
        server = NatsServer(nats_dir, port=port, users=credentials).start()
        try:
            asyncio.run(ops_can_connect(server, first["ops"]))
            # The CLI's way in: IOPNET_NATS_URL unset, the ops password from the file.
            assert ops_url(tmp_path, server.url) == server.user_url("ops")
            assert stat.S_IMODE((nats_dir / "nats.conf").stat().st_mode) == 0o600
        finally:
            server.stop()
    assert ops_url(tmp_path / "elsewhere", server.url) == server.url  # no file: no user
    assert ops_url(tmp_path, "nats://someone:pw@h:4222") == "nats://someone:pw@h:4222"  # a given user wins


def test_deploy_nats_conf_has_the_same_accounts_users_and_permissions(tmp_path: Path) -> None:
    conf = (REPO / "deploy" / "nats.conf").read_text()
    references = {user: f"${variable}" for user, variable in PASSWORD_ENV.items()}
    assert accounts_block(references, quote_passwords=False) in conf

    def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k not in PASSWORD_ENV.values()}
        return subprocess.run(
            [nats_server_binary(), "-t", "-c", str(REPO / "deploy" / "nats.conf")],
            env={**base, **env},
            capture_output=True,
            text=True,
        )

    # As docker-compose.yml passes them: quoted, so a password like "-12" stays a string.
    quoted = {variable: f'"-12{index}x"' for index, variable in enumerate(PASSWORD_ENV.values())}
    assert check(quoted).returncode == 0, check(quoted).stderr
    missing = dict(quoted)
    del missing[PASSWORD_ENV["ops"]]
    assert check(missing).returncode != 0  # an unset password stops the server

    # docker-compose.yml's wiring (secret files, one NATS user per service): tests/deploy/test_compose.py
