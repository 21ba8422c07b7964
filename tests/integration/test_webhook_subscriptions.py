"""Webhook subscriptions against a real nats-server, a real database (SQLite and
PostgreSQL) and a real HTTP receiver on loopback (tests/conftest.py's HttpPeer, a
threading http.server):

- every public event type of the catalog may be subscribed (ProgramPublished and the
  others a hand-kept list used to miss), a restricted one never (422, DESIGN A6 shape);
  the durables that already exist grow the filter subjects those types need;
- one request at a time per subscription, in stream order, a failing one retried in
  place before anything behind it;
- after N failed attempts in a row the subscription is paused with its reason, events
  keep queueing, nothing is sent; resumed, it goes on from where it stopped, losing
  nothing;
- `backfill_from`: the site's past events of the subscribed types first, in order, then
  the live ones, each once; a backfill past its bound pauses the subscription instead;
- the delivery log: attempts, status codes, timings, next retry, paged, ids only, for
  the integration that owns the subscription.
"""

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from iopnet.testing import eventually
from services.notifications.app import create_app
from services.notifications.usecases import WEBHOOK_EVENTS, WebhookSettings
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import (
    EVENT_TYPES,
    PatientWaitlisted,
    SessionCompleted,
    SessionScheduled,
    TreatmentPlanUpdated,
)
from shared.messaging.connection import connect_once
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import HttpPeer, SmtpSink, auth, program_published, publish, running, token
from tests.integration.test_notifications_delivery import (
    SITE,
    live_settings,
    publish_and_settle,
    register_integration,
    register_site,
)

OTHER_SITE = "dayton-north"
SECRET = "whsec-" + "o" * 24
OWNER = auth("integration", [SITE])
PATH = "/hooks/ehr"


class SlowPeer(HttpPeer):
    """The conftest receiver, answering each POST after a short piece of work (as a real
    receiver would), and counting how many requests it has in hand at once."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most_in_flight = 0
        self._count = threading.Lock()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        with self._count:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            threading.Event().wait(0.01)  # the receiver's own work, not a wait on the test
            return super()._answer(path, headers, body)
        finally:
            with self._count:
                self.in_flight -= 1

    def delivered(self, path: str = PATH) -> list[str]:
        """Event ids of the POSTs answered 200, in the order they arrived."""
        return [json.loads(r["body"])["event_id"] for r in self.posts(path, status=200)]


@pytest.fixture
def peer() -> Any:
    receiver = SlowPeer().start()
    receiver.secrets[PATH] = SECRET
    try:
        yield receiver
    finally:
        receiver.stop()


def make_app(nats_server: Any, database_url: str, tmp_path: Path, smtp: SmtpSink, peer: HttpPeer, **webhooks: Any):
    settings = live_settings(nats_server.url, tmp_path, database_url, smtp, peer, notify_max_attempts=2)
    return create_app(settings, WebhookSettings(**webhooks))


def hook(events: list[str], **extra: Any) -> dict[str, Any]:
    return {"site_id": SITE, "url": "", "events": events, "secret": SECRET, **extra}


async def subscribe(client: Any, peer: HttpPeer, events: list[str], **extra: Any) -> dict[str, Any]:
    created = await client.post("/subscriptions", json={**hook(events, **extra), "url": peer.url(PATH)}, headers=OWNER)
    assert created.status_code == 201, created.text
    return dict(created.json())


def scheduled(site_id: str = SITE) -> Envelope:
    start = datetime(2026, 12, 7, 14, tzinfo=UTC)
    event = SessionScheduled(
        session_id=uuid4(), program_id="adult-iop", kind="group_therapy", title="Group",
        starts_at=start, ends_at=start + timedelta(hours=3), capacity=12,
    )  # fmt: skip
    return new_envelope(event, site_id=site_id)


def waitlisted(site_id: str = SITE) -> Envelope:
    return new_envelope(PatientWaitlisted(session_id=uuid4(), patient_id=uuid4(), position=2), site_id=site_id)


def completed(site_id: str = SITE) -> Envelope:
    start = datetime(2026, 12, 7, 14, tzinfo=UTC)
    event = SessionCompleted(
        session_id=uuid4(), kind="wrap_up", started_at=start, ended_at=start + timedelta(minutes=30),
        present_count=7, absent_count=1,
    )  # fmt: skip
    return new_envelope(event, site_id=site_id)


def plan_updated(site_id: str = SITE) -> Envelope:
    event = TreatmentPlanUpdated(patient_id=uuid4(), enrollment_id=uuid4(), plan_id=uuid4(), goals=[])
    return new_envelope(event, site_id=site_id)


def mixed(n: int) -> list[Envelope]:
    """n scheduling events of the four kinds a hand-kept list used to refuse or miss."""
    kinds = [lambda: program_published(SITE, program_id=f"p-{uuid4().hex[:6]}"), scheduled, waitlisted, completed]
    return [kinds[i % len(kinds)]() for i in range(n)]


async def deliveries(client: Any, subscription_id: str, **params: Any) -> dict[str, Any]:
    page = await client.get(f"/subscriptions/{subscription_id}/deliveries", params=params, headers=OWNER)
    assert page.status_code == 200, page.text
    return dict(page.json())


# --- what may be subscribed -------------------------------------------------------------------------


async def test_every_public_event_type_is_subscribable_and_restricted_ones_are_refused(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer
) -> None:
    public = sorted(name for name, cls in EVENT_TYPES.items() if not cls.restricted)
    assert sorted(WEBHOOK_EVENTS) == public
    app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer)
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        everything = await subscribe(client, peer, public)
        assert everything["events"] == public
        for name in ("ProgramPublished", "PatientTransferred", "TreatmentPlanUpdated", "PatientWaitlisted",
                     "SessionCompleted"):  # fmt: skip
            assert name in everything["events"]
        assert everything["status"] == "active" and everything["backfill_status"] == "none"

        for refused in (["PatientContactChanged"], ["ProgramPublished", "PatientContactChanged"], ["NoSuchEvent"]):
            answer = await client.post("/subscriptions", json={**hook(refused), "url": peer.url(PATH)}, headers=OWNER)
            assert answer.status_code == 422, refused
            error = answer.json()["error"]
            assert error["code"] == "invalid"
            assert "events" in error["fields"] and "not subscribable" in error["fields"]["events"]
            assert "PatientContactChanged" not in error["fields"]["events"].split("choose from")[1]
        listed = (await client.get("/subscriptions", headers=OWNER)).json()
        assert [s["subscription_id"] for s in listed] == [everything["subscription_id"]]


async def test_the_durables_read_a_webhook_only_type_only_where_a_subscription_asks_for_it(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer
) -> None:
    """A deployment upgraded in place (the durables exist with the filters of before):
    a type read for webhooks only is added for the subscription's site when it
    subscribes, and removed when it unsubscribes; nothing else of the durable changes."""
    old = {
        "IOP_INTAKE": ["iop.intake.patient_enrolled.*", "iop.intake.site_registered.*"],
        "IOP_SCHEDULING": ["iop.scheduling.session_scheduled.*", "iop.scheduling.patient_booked.*"],
    }
    nc = await connect_once(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"], STREAMS["IOP_SCHEDULING"]], 120)
        for stream, filters in old.items():
            config = ConsumerConfig(
                durable_name=f"notifications-{stream}", ack_policy=AckPolicy.EXPLICIT, filter_subjects=filters
            )
            await js.add_consumer(stream, config)
        app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer)
        async with running(app) as client:
            await register_integration(app, nats_server.url, [SITE])
            created = await subscribe(client, peer, ["ProgramPublished", "TreatmentPlanUpdated"])
            await publish(nats_server.url, program_published(SITE), plan_updated())
            await eventually(lambda: _async(len(peer.delivered()) == 2), what="both events delivered")
            for stream, filters in old.items():
                info = await js.consumer_info(stream, f"notifications-{stream}")
                assert set(filters) < set(info.config.filter_subjects or [])
            asked = {
                "IOP_SCHEDULING": f"iop.scheduling.program_published.{SITE}",
                "IOP_INTAKE": f"iop.intake.treatment_plan_updated.{SITE}",
            }
            for stream, subject in asked.items():
                filters = (await js.consumer_info(stream, f"notifications-{stream}")).config.filter_subjects or []
                assert subject in filters
                # Only that site; the types nobody subscribed to are not read at all.
                assert not any(f.startswith("iop.scheduling.session_completed") for f in filters)
                assert not any(f.endswith(f"{OTHER_SITE}") for f in filters)

            async def recorded_sent() -> bool:  # the record follows the send: wait for it
                return (await deliveries(client, created["subscription_id"]))["items"][0]["status"] == "sent"

            await eventually(recorded_sent, what="the delivery recorded as sent")

            sid = created["subscription_id"]
            assert (await client.delete(f"/subscriptions/{sid}", headers=OWNER)).status_code == 204
            for stream, subject in asked.items():
                info = await js.consumer_info(stream, f"notifications-{stream}")
                assert subject not in (info.config.filter_subjects or [])
                assert set(old[stream]) < set(info.config.filter_subjects or [])
    finally:
        await nc.close()


async def _async(value: Any) -> Any:
    return value


# --- order, retries, pause and resume ------------------------------------------------------------------


async def test_deliveries_go_one_at_a_time_in_stream_order_and_a_retry_keeps_its_place(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer
) -> None:
    app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer)
    events = mixed(12)
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await register_site(app, nats_server.url)
        created = await subscribe(client, peer, ["ProgramPublished", "SessionScheduled", "PatientWaitlisted",
                                                 "SessionCompleted"])  # fmt: skip
        peer.fail[PATH] = 2  # the first event meets two 500s (more than notify_max_attempts=2: never given up)
        await publish(nats_server.url, *events, program_published(OTHER_SITE))

        await eventually(lambda: _async(len(peer.delivered()) == 12), what="12 deliveries", timeout=20)
        assert peer.delivered() == [str(e.event_id) for e in events]
        posts = peer.posts(PATH)
        assert [p["status"] for p in posts[:3]] == [500, 500, 200]
        assert {json.loads(p["body"])["event_id"] for p in posts[:3]} == {str(events[0].event_id)}
        assert len(posts) == 14  # nothing twice, the other site's ProgramPublished never
        assert all(p["signature_ok"] for p in posts)
        assert peer.most_in_flight == 1

        # The delivery log: the latest first, in pages; attempts with status codes and timings.
        sid = created["subscription_id"]
        first = await deliveries(client, sid, limit=5)
        second = await deliveries(client, sid, limit=5, before=first["next"])
        third = await deliveries(client, sid, limit=5, before=second["next"])
        assert third["next"] is None
        items = first["items"] + second["items"] + third["items"]
        assert [i["event_id"] for i in items] == [str(e.event_id) for e in reversed(events)]
        assert [i["position"] for i in items] == sorted((i["position"] for i in items), reverse=True)
        retried = items[-1]
        assert (retried["status"], retried["attempts"], retried["phase"]) == ("sent", 3, "live")
        assert [(a["outcome"], a["status_code"]) for a in retried["log"]] == [
            ("retry", 500), ("retry", 500), ("sent", 200),
        ]  # fmt: skip
        assert all(a["duration_ms"] is not None and a["duration_ms"] >= 0 for a in retried["log"])
        assert retried["last_status_code"] == 200 and retried["next_attempt_at"] is None
        assert retried["delivery_id"] == posts[0]["headers"]["X-Iopnet-Delivery-Id"]
        assert {i["event_type"] for i in items} == {"ProgramPublished", "SessionScheduled", "PatientWaitlisted",
                                                    "SessionCompleted"}  # fmt: skip
        # Ids only: nothing of the event's body is in the log.
        text = json.dumps(items)
        assert "data" not in items[0] and "Adult IOP" not in text and "payload" not in text

        # The owner's log only: another integration of the same site, or another site, gets a 404.
        someone_else = {"Authorization": f"Bearer {token('integration', [SITE], sub='someone-else')}"}
        for stranger in (someone_else, auth("integration", [OTHER_SITE])):
            answer = await client.get(f"/subscriptions/{sid}/deliveries", headers=stranger)
            assert answer.status_code == 404
        assert (await client.get(f"/subscriptions/{sid}/deliveries", headers=auth("site_admin", [SITE]))).is_success
        assert (
            await client.get(f"/subscriptions/{sid}/deliveries", params={"before": "x"}, headers=OWNER)
        ).status_code == 422


async def test_a_failing_subscription_is_paused_and_resumed_without_losing_anything(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer
) -> None:
    app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer, pause_after_failures=3)
    first, *later = mixed(4)
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        created = await subscribe(client, peer, ["ProgramPublished", "SessionScheduled", "PatientWaitlisted",
                                                 "SessionCompleted"])  # fmt: skip
        sid = created["subscription_id"]
        peer.fail[PATH] = 10**6  # the receiver is down
        await publish(nats_server.url, first)

        async def paused() -> dict[str, Any]:
            current = (await client.get(f"/subscriptions/{sid}", headers=OWNER)).json()
            return current if current["status"] == "paused" else {}

        state = await eventually(paused, what="the subscription paused")
        assert state["consecutive_failures"] == 3
        assert state["paused_reason"] == "3 consecutive failed deliveries; last: HTTP 500"
        assert len(peer.posts(PATH)) == 3

        # Paused: later events queue, nothing is sent, nothing is scheduled.
        await publish_and_settle(app, nats_server.url, *later)
        log = await deliveries(client, sid)
        assert log["status"] == "paused"
        assert [i["event_id"] for i in log["items"]] == [str(e.event_id) for e in reversed([first, *later])]
        assert all(i["status"] == "pending" and i["next_attempt_at"] is None for i in log["items"])
        dispatcher = app.state.notifier.dispatcher
        assert await dispatcher.dispatch_due(app.state.runtime.sessions) == 0
        assert len(peer.posts(PATH)) == 3

        # The receiver is back; resumed, delivery goes on from the event it stopped at.
        peer.fail[PATH] = 0
        resumed = await client.post(f"/subscriptions/{sid}/resume", headers=OWNER)
        assert resumed.status_code == 200, resumed.text
        assert (resumed.json()["status"], resumed.json()["consecutive_failures"]) == ("active", 0)
        await eventually(lambda: _async(len(peer.delivered()) == 4), what="all four delivered")
        assert peer.delivered() == [str(e.event_id) for e in (first, *later)]
        again = await client.post(f"/subscriptions/{sid}/resume", headers=OWNER)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        [head] = [i for i in (await deliveries(client, sid))["items"] if i["event_id"] == str(first.event_id)]
        assert head["attempts"] == 4 and [a["status_code"] for a in head["log"]] == [500, 500, 500, 200]


# --- backfill ------------------------------------------------------------------------------------------------


async def test_backfill_delivers_the_past_first_in_order_then_the_live_events(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer
) -> None:
    app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer)
    too_old = program_published(SITE, program_id="before-the-window")
    past = [scheduled(), program_published(SITE, program_id="p-1"), plan_updated(), waitlisted(), plan_updated()]
    noise = [program_published(OTHER_SITE), completed()]  # another site; a type not subscribed
    live = [waitlisted(), plan_updated(), scheduled()]
    events = ["ProgramPublished", "SessionScheduled", "PatientWaitlisted", "TreatmentPlanUpdated"]
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await publish_and_settle(app, nats_server.url, too_old)
        since = datetime.now(UTC)
        for envelope in past[:3] + noise + past[3:]:  # one at a time: their stored order is this order
            await publish_and_settle(app, nats_server.url, envelope)

        created = await subscribe(client, peer, events, backfill_from=since.isoformat())
        assert created["backfill_status"] == "pending"
        await publish(nats_server.url, *live)  # while the backfill may still be reading

        expected = [str(e.event_id) for e in past + live]
        await eventually(lambda: _async(len(peer.delivered()) >= len(expected)), what="past and live delivered")
        got = peer.delivered()
        # Each once, the past first in stored order; the live ones after it, in order within
        # their stream (two streams' consumers run side by side: no order between them).
        assert len(got) == len(expected) and got[: len(past)] == expected[: len(past)]
        assert sorted(got[len(past) :]) == sorted(expected[len(past) :])
        on_scheduling = [str(e.event_id) for e in live if e.producer == "scheduling"]
        assert [i for i in got if i in on_scheduling] == on_scheduling
        sid = created["subscription_id"]
        state = (await client.get(f"/subscriptions/{sid}", headers=OWNER)).json()
        assert state["backfill_status"] == "done" and state["backfill_events"] >= len(past)
        items = (await deliveries(client, sid))["items"]
        phases = {i["event_id"]: i["phase"] for i in items}
        assert all(phases[str(e.event_id)] == "backfill" for e in past)
        assert (await client.delete(f"/subscriptions/{sid}", headers=OWNER)).status_code == 204

    # Bounded: a backfill of more past events than allowed pauses the subscription with
    # the reason; resumed, it goes on with live events only.
    bounded = create_app(app.state.settings, WebhookSettings(backfill_max_events=2))
    async with running(bounded) as client:
        await register_integration(bounded, nats_server.url, [SITE])
        created = await subscribe(client, peer, events, backfill_from=since.isoformat())
        sid = created["subscription_id"]

        async def settled() -> dict[str, Any]:
            current = (await client.get(f"/subscriptions/{sid}", headers=OWNER)).json()
            return current if current["backfill_status"] != "pending" else {}

        state = await eventually(settled, what="the backfill settled")
        assert (state["backfill_status"], state["status"]) == ("too_large", "paused")
        assert state["paused_reason"] == "backfill too large: more than 2 events since backfill_from"
        assert (await client.post(f"/subscriptions/{sid}/resume", headers=OWNER)).status_code == 200
        fresh = scheduled()
        before = len(peer.delivered())
        await publish(nats_server.url, fresh)
        await eventually(lambda: _async(len(peer.delivered()) > before), what="a live event after the resume")
        assert peer.delivered()[before:] == [str(fresh.event_id)]
        assert (await client.get(f"/subscriptions/{sid}", headers=OWNER)).json()["backfill_status"] == "skipped"

        # backfill_from is bounded too.
        for when, problem in (
            (datetime.now(UTC) + timedelta(hours=1), "must be a past time"),
            (datetime.now(UTC) - timedelta(days=31), "at most 30 days back"),
        ):
            body = {**hook(events, backfill_from=when.isoformat()), "url": peer.url(PATH)}
            answer = await client.post("/subscriptions", json=body, headers=OWNER)
            assert answer.status_code == 422 and answer.json()["error"]["fields"] == {"backfill_from": problem}
