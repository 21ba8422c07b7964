"""Webhooks follow the integration's basis, as intake's feed does (issue 11, 42 CFR Part 2),
against a real nats-server, both databases and a real HTTP receiver:

- only an integration intake registered may subscribe, for one of its sites;
- basis `consent`: an event about a patient is delivered only while the patient's consent
  names the integration for its purpose, granted before the event; context events
  (programs, sessions) go;
- each delivery under consent is reported, on the restricted subject, to intake for the
  patient's accounting of disclosures;
- a revoked integration's subscription delivers nothing more.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from iopnet.testing import BusRecorder, eventually
from shared.contracts import new_envelope
from shared.contracts.events import CheckInSubmitted, IntegrationRevoked
from tests.conftest import SmtpSink, program_published, running, token
from tests.integration.test_notifications_delivery import (
    SITE,
    consent_event,
    publish_and_settle,
    register_integration,
    register_site,
)
from tests.integration.test_webhook_subscriptions import OTHER_SITE, PATH, SECRET, SlowPeer, hook, make_app

INTEGRATION = "research-x"
RESEARCHER = {"Authorization": f"Bearer {token('integration', [SITE], sub=INTEGRATION)}"}


@pytest.fixture
def peer() -> Iterator[SlowPeer]:
    receiver = SlowPeer().start()
    receiver.secrets[PATH] = SECRET
    try:
        yield receiver
    finally:
        receiver.stop()


def check_in(patient_id: UUID) -> Any:
    event = CheckInSubmitted(
        check_in_id=uuid4(), patient_id=patient_id, enrollment_id=uuid4(), submitted_at="2026-12-07T14:00:00Z",
        mood=6, craving=2, used_since_last=False, safety_concern=False, risk="low",
    )  # fmt: skip
    return new_envelope(event, site_id=SITE)


async def test_a_consent_based_integrations_webhook_gets_a_patients_events_only_under_consent(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, peer: SlowPeer, bus: BusRecorder
) -> None:
    app = make_app(nats_server, database_url, tmp_path, smtp_sink, peer)
    events = ["CheckInSubmitted", "ConsentGranted", "ProgramPublished"]
    async with running(app) as client:
        await register_site(app, nats_server.url)
        body = {**hook(events), "url": peer.url(PATH)}
        unknown = await client.post("/subscriptions", json=body, headers=RESEARCHER)
        assert unknown.status_code == 403 and unknown.json()["error"]["code"] == "forbidden"

        await register_integration(app, nats_server.url, [SITE], INTEGRATION, "consent", "research")
        other_site = {**body, "site_id": OTHER_SITE}
        other_token = {"Authorization": f"Bearer {token('integration', [OTHER_SITE], sub=INTEGRATION)}"}
        assert (await client.post("/subscriptions", json=other_site, headers=other_token)).status_code == 403
        created = await client.post("/subscriptions", json=body, headers=RESEARCHER)
        assert created.status_code == 201, created.text
        assert created.json()["integration_id"] == INTEGRATION

        consenting, other_purpose, never = uuid4(), uuid4(), uuid4()
        before_consent = check_in(consenting)
        await publish_and_settle(app, nats_server.url, before_consent)
        consent = consent_event(consenting, recipient=f"org:{INTEGRATION}", purpose="research")
        wrong_purpose = consent_event(other_purpose, recipient=f"org:{INTEGRATION}", purpose="treatment")
        await publish_and_settle(app, nats_server.url, consent, wrong_purpose)
        consented = check_in(consenting)
        context = program_published(SITE, program_id="adult-pm")
        await publish_and_settle(app, nats_server.url, consented, check_in(other_purpose), check_in(never))
        # Settled apart: the check-in and the program are read by different consumers, and a
        # subscription's queue is in the order its events were taken, not published.
        await publish_and_settle(app, nats_server.url, context)

        expected = [str(consent.event_id), str(consented.event_id), str(context.event_id)]

        async def delivered() -> list[str] | None:
            got = peer.delivered()
            return got if len(got) >= len(expected) else None

        assert await eventually(delivered, timeout=20, what="the deliveries under consent") == expected

        # Each delivery of an event about the patient is reported for their accounting.
        found = await bus.wait_for_event("DisclosureRecorded", count=2, timeout=20)
        reports = [m.envelope()["data"] for m in found]
        assert {(r["event_id"], r["event_type"]) for r in reports} == {
            (str(consent.event_id), "ConsentGranted"),
            (str(consented.event_id), "CheckInSubmitted"),
        }
        assert all(r["patient_id"] == str(consenting) and r["recipient"] == f"org:{INTEGRATION}" for r in reports)
        assert all(r["purpose"] == "research" and r["channel"] == "webhook" for r in reports)
        assert {m.subject for m in found} == {f"iop.restricted.notifications.disclosure_recorded.{SITE}"}

        # Revoked: nothing more, not even context.
        revoked = new_envelope(IntegrationRevoked(integration_id=INTEGRATION), site_id=SITE)
        await publish_and_settle(app, nats_server.url, revoked)
        await publish_and_settle(app, nats_server.url, check_in(consenting), program_published(SITE, "adult-late"))
        page = await client.get(f"/subscriptions/{created.json()['subscription_id']}/deliveries", headers=RESEARCHER)
        assert page.status_code == 200
        # Nothing was even queued after the revocation (a queued one would show here).
        assert [d["event_id"] for d in page.json()["items"]] == expected[::-1]
        assert peer.delivered() == expected
        assert json.loads(peer.posts(PATH, status=200)[0]["body"])["event_type"] == "ConsentGranted"
