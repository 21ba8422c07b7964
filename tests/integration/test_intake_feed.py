"""The consent-gated feed and the accounting of disclosures (issue 11, 42 CFR Part 2), on
SQLite and PostgreSQL against a real nats-server: an integration with basis `consent`
gets, in `iop.feed.<integration>.>`, an event about a patient only while that patient has
an active consent naming it (`org:<integration>`) for its purpose, from the consent on;
a revocation stops it at once; each such event is entered in the patient's accounting,
which the patient and their site's admins may read (paged, audited)."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from iopnet.testing import eventually
from services.intake import store, usecases
from services.intake.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import DisclosureRecorded
from tests.conftest import auth, make_settings, program_published, publish, running
from tests.integration.test_intake_care import ADMIN, DESK, OTHER, SITE, enrolled_patient

INTEGRATION = "research-x"
FEED = f"iop.feed.{INTEGRATION}.>"


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


def consent(purpose: str = "research", recipient: str = f"org:{INTEGRATION}") -> dict[str, Any]:
    return {
        "recipient": recipient,
        "purpose": purpose,
        "information": "Check-ins and attendance, without notes",
        "expires_on": "2099-01-01",
        "signed_at": datetime.now(UTC).isoformat(),
    }


async def publish_programs(app, nats_url: str) -> None:
    """Scheduling's programs at both sites, as intake's projection learns them."""
    for site_id in (SITE, OTHER):
        await publish(nats_url, program_published(site_id, f"{site_id}-adult"))

    async def known() -> bool:
        async with app.state.runtime.sessions() as session:
            return len(await store.list_programs(session, None)) == 2

    await eventually(known, what="the programs projected")


async def check_in(client, patient_id: str) -> None:
    body = {"mood": 6, "craving": 2, "used_since_last": False, "safety_concern": False, "sleep_hours": 7}
    answer = await client.post(f"/patients/{patient_id}/check-ins", json=body, headers=DESK)
    assert answer.status_code == 201, answer.text


async def feed_contents(nats_url: str) -> list[dict[str, Any]]:
    """Every envelope in the integration's feed so far, in order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            FEED,
            stream="IOP_FEED",
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        envelopes: list[dict[str, Any]] = []
        while True:
            try:
                batch = await sub.fetch(100, timeout=0.5)
            except TimeoutError:  # nats-py raises its own, or asyncio's when time ran out mid-fetch
                return envelopes
            envelopes += [json.loads(m.data) | {"_subject": m.subject} for m in batch]
    finally:
        await nc.close()


async def in_feed(nats_url: str, event_type: str, patient_id: str) -> bool:
    return any(
        e["event_type"] == event_type and e["data"].get("patient_id") == patient_id
        for e in await feed_contents(nats_url)
    )


async def test_the_feed_carries_a_patients_events_only_under_consent_and_accounts_for_them(app, nats_server) -> None:
    async with running(app) as client:
        for site_id in (SITE, OTHER):
            site = {"site_id": site_id, "name": site_id.title(), "timezone": "America/New_York"}
            assert (await client.post("/sites", json=site, headers=ADMIN)).status_code == 201
        body = {"integration_id": INTEGRATION, "sites": [SITE], "basis": "consent", "purpose": "research"}
        assert (await client.post("/integrations", json=body, headers=ADMIN)).status_code == 201
        await publish_programs(app, nats_server.url)
        consenting, _ = await enrolled_patient(client)  # enrolled before any consent
        other_purpose, _ = await enrolled_patient(client, given="Ramón", family="Iturbe", born="1979-02-02")
        never, _ = await enrolled_patient(client, given="Inés", family="Galván", born="1985-05-05")
        marker, _ = await enrolled_patient(client, given="Pilar", family="Ochoa", born="1990-09-09")

        granted = await client.post(f"/patients/{consenting}/consents", json=consent(), headers=DESK)
        assert granted.status_code == 201, granted.text
        treatment = consent(purpose="treatment")
        assert (await client.post(f"/patients/{other_purpose}/consents", json=treatment, headers=DESK)).is_success
        await check_in(client, other_purpose)
        await check_in(client, never)
        await check_in(client, consenting)
        # Forwarded only while the consent holds when the feed lane gets to it: revoke after.
        await eventually(lambda: in_feed(nats_server.url, "CheckInSubmitted", consenting), what="the check-in fed")
        revoked = await client.post(f"/consents/{granted.json()['consent_id']}/revoke", json={}, headers=DESK)
        assert revoked.status_code == 200, revoked.text
        await check_in(client, consenting)  # after the revocation: not forwarded
        # The marker: consented last, so once its check-in is in the feed, the feed lane
        # has applied every earlier event of the stream.
        assert (await client.post(f"/patients/{marker}/consents", json=consent(), headers=DESK)).is_success
        await check_in(client, marker)

        await eventually(lambda: in_feed(nats_server.url, "CheckInSubmitted", marker), what="the marker fed")
        envelopes = await feed_contents(nats_server.url)
        about = [(e["event_type"], e["data"].get("patient_id")) for e in envelopes if "patient_id" in e["data"]]
        assert about == [
            ("ConsentGranted", consenting),
            ("CheckInSubmitted", consenting),
            ("ConsentGranted", marker),
            ("CheckInSubmitted", marker),
        ]
        context = {(e["event_type"], e["site_id"]) for e in envelopes if "patient_id" not in e["data"]}
        assert ("ProgramPublished", SITE) in context  # context, published after the integration was added
        assert all(site == SITE for _, site in context)  # nothing of the other site
        for envelope in envelopes:  # unchanged but for the subject: the integrator de-duplicates by event_id
            original = envelope["_subject"].removeprefix(f"iop.feed.{INTEGRATION}.")
            assert original.endswith(f".{envelope['site_id']}") and "." in original

        # The patient's accounting: the two events that left under the consent.
        own = await client.get(f"/patients/{consenting}/disclosures", headers=auth("patient", [], consenting))
        assert own.status_code == 200, own.text
        entries = own.json()["disclosures"]
        assert sorted(e["event_type"] for e in entries) == ["CheckInSubmitted", "ConsentGranted"]
        assert all(e["recipient"] == f"org:{INTEGRATION}" and e["purpose"] == "research" for e in entries)
        assert {e["event_id"] for e in entries} == {
            e["event_id"] for e in envelopes if e["data"].get("patient_id") == consenting
        }
        first = await client.get(
            f"/patients/{consenting}/disclosures", params={"limit": 1}, headers=auth("site_admin", [SITE])
        )
        assert len(first.json()["disclosures"]) == 1 and first.json()["next_offset"] == 1
        last = await client.get(
            f"/patients/{consenting}/disclosures", params={"limit": 1, "offset": 1}, headers=auth("site_admin", [SITE])
        )
        assert len(last.json()["disclosures"]) == 1 and last.json()["next_offset"] is None
        nothing = await client.get(f"/patients/{never}/disclosures", headers=auth("site_admin", [SITE]))
        assert nothing.json() == {"disclosures": [], "next_offset": None}

        path = f"/patients/{consenting}/disclosures"
        assert (await client.get(path, headers=auth("clinician", [SITE]))).status_code == 403
        assert (await client.get(path, headers=auth("site_admin", [OTHER]))).status_code == 404
        assert (await client.get(path, headers=auth("patient", [], never))).status_code == 404
        audit = await client.get("/audit", params={"patient_id": consenting}, headers=auth("site_admin", [SITE]))
        assert [r["action"] for r in audit.json()].count("disclosures.read") >= 3


async def test_a_webhook_delivery_reported_by_notifications_enters_the_patients_accounting(app, nats_server) -> None:
    async with running(app) as client:
        site = {"site_id": SITE, "name": "Columbus", "timezone": "America/New_York"}
        assert (await client.post("/sites", json=site, headers=ADMIN)).status_code == 201
        await publish_programs(app, nats_server.url)
        patient, _ = await enrolled_patient(client)
        delivered = uuid4()
        report = DisclosureRecorded(
            patient_id=UUID(patient), recipient=f"org:{INTEGRATION}", purpose="research", channel="webhook",
            event_type="CheckInSubmitted", event_id=delivered, disclosed_at=datetime.now(UTC),
        )  # fmt: skip
        envelope = new_envelope(report, site_id=SITE)
        assert envelope.subject == f"iop.restricted.notifications.disclosure_recorded.{SITE}"
        await publish(nats_server.url, envelope)
        await publish(nats_server.url, envelope, msg_id_prefix="again-")  # past JetStream's de-duplication

        async def entered() -> list[dict[str, Any]] | None:
            page = await client.get(f"/patients/{patient}/disclosures", headers=auth("patient", [], patient))
            return page.json()["disclosures"] or None

        [entry] = await eventually(entered, what="the reported delivery in the accounting")
        assert entry["channel"] == "webhook" and entry["event_id"] == str(delivered)
        assert entry["recipient"] == f"org:{INTEGRATION}" and entry["event_type"] == "CheckInSubmitted"


async def test_an_event_redelivered_to_the_feed_lane_is_forwarded_and_accounted_once(app, nats_server) -> None:
    """The feed lane keeps no inbox rows (it reads every event of the network): its effects
    are keyed, so applying an event again changes nothing."""
    async with running(app) as client:
        site = {"site_id": SITE, "name": "Columbus", "timezone": "America/New_York"}
        assert (await client.post("/sites", json=site, headers=ADMIN)).status_code == 201
        body = {"integration_id": INTEGRATION, "sites": [SITE], "basis": "consent", "purpose": "research"}
        assert (await client.post("/integrations", json=body, headers=ADMIN)).status_code == 201
        await publish_programs(app, nats_server.url)
        patient, _ = await enrolled_patient(client)
        assert (await client.post(f"/patients/{patient}/consents", json=consent(), headers=DESK)).is_success
        await check_in(client, patient)
        await eventually(lambda: in_feed(nats_server.url, "CheckInSubmitted", patient), what="the check-in fed")
        [fed] = [e for e in await feed_contents(nats_server.url) if e["event_type"] == "CheckInSubmitted"]
        envelope = Envelope.model_validate({k: v for k, v in fed.items() if k != "_subject"})
        for _ in range(2):  # as a redelivery would
            async with app.state.runtime.sessions() as session, session.begin():
                assert await usecases.forward_to_feeds(session, envelope, envelope.event()) == 0
        page = await client.get(f"/patients/{patient}/disclosures", headers=auth("patient", [], patient))
        assert [e["event_type"] for e in page.json()["disclosures"]].count("CheckInSubmitted") == 1
        assert [e["event_type"] for e in await feed_contents(nats_server.url)].count("CheckInSubmitted") == 1


async def feed_filters(nats_url: str, stream: str = "IOP_INTAKE") -> list[str] | None:
    """The filter subjects of intake's feed-lane durable on `stream`; None if it has none."""
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().consumer_info(stream, f"intake-{stream}-feed")
    except NotFoundError:
        return None
    finally:
        await nc.close()
    return info.config.filter_subjects or [info.config.filter_subject or ""]


async def test_the_feed_lane_reads_only_the_sites_of_consent_integrations_and_lies_dormant_without_one(
    app, nats_server
) -> None:
    """Issue 10: outside systems cost nothing where nobody asked. No durable (and nothing
    read) until a consent-based integration exists; then only its sites; gone again when
    the last one is revoked. A `qsoa` integration reads the streams itself: no feed."""
    async with running(app) as client:
        for site_id in (SITE, OTHER):
            site = {"site_id": site_id, "name": site_id.title(), "timezone": "America/New_York"}
            assert (await client.post("/sites", json=site, headers=ADMIN)).status_code == 201
        lane = next(c for c in app.state.runtime.consumers if c.durable == "intake-IOP_INTAKE-feed")
        await eventually(lambda: _now(lane.dormant), what="the feed lane dormant")
        assert await feed_filters(nats_server.url) is None
        direct = {"integration_id": "warehouse", "sites": [SITE, OTHER], "basis": "qsoa"}
        assert (await client.post("/integrations", json=direct, headers=ADMIN)).status_code == 201
        assert lane.dormant and await feed_filters(nats_server.url) is None
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text  # dormant is not unready

        body = {"integration_id": INTEGRATION, "sites": [SITE], "basis": "consent", "purpose": "research"}
        assert (await client.post("/integrations", json=body, headers=ADMIN)).status_code == 201
        filters = await feed_filters(nats_server.url)
        assert not lane.dormant and filters, "the lane is bound once the route answers"
        assert all(f.endswith(f".{SITE}") for f in filters)
        assert "iop.intake.check_in_submitted.columbus-east" in filters
        # Its durable starts just before the integration was added (not at the stream's start).
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().consumer_info("IOP_INTAKE", "intake-IOP_INTAKE-feed")
        finally:
            await nc.close()
        assert info.config.deliver_policy == DeliverPolicy.BY_START_TIME
        assert info.config.opt_start_time is not None

        # The other site only once an integration covers it; the durable keeps its place.
        second = {"integration_id": "research-y", "sites": [OTHER], "basis": "consent", "purpose": "research"}
        assert (await client.post("/integrations", json=second, headers=ADMIN)).status_code == 201
        filters = await feed_filters(nats_server.url)
        assert filters and {f.rsplit(".", 1)[1] for f in filters} == {SITE, OTHER}

        for integration_id in (INTEGRATION, "research-y"):
            assert (await client.post(f"/integrations/{integration_id}/revoke", headers=ADMIN)).status_code == 200
        assert lane.dormant and await feed_filters(nats_server.url) is None
        metrics = (await client.get("/metrics")).text
        assert 'iopnet_consumer_pending{consumer="intake-IOP_INTAKE-feed"} 0.0' in metrics
        assert 'iopnet_consumer_dormant{consumer="intake-IOP_INTAKE-feed"} 1.0' in metrics


async def _now(value: bool) -> bool:
    return value
