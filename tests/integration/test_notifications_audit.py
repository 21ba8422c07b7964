"""Every read of patient data in notifications, and every denied attempt at it, leaves an
audit row (DESIGN B5), against a real nats-server and a real database (SQLite and
PostgreSQL): a caller from another site gets the same 404 as for an unknown record, and
the attempt is recorded against the patient's site."""

from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import select

from iopnet.testing import BusRecorder
from services.notifications import store
from services.notifications.app import create_app
from shared.auth import Role
from tests.conftest import HttpPeer, SmtpSink, running, token
from tests.integration.test_notifications_alerts import ROSTER, check_in
from tests.integration.test_notifications_delivery import (
    SITE,
    Patient,
    live_settings,
    onboard,
    publish_and_settle,
    register_site,
)

OTHER_SITE = "dayton-north"


def caller(role: Role, site: str, sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, [site], sub=sub)}"}


INSIDER = caller("clinician", SITE, "insider")
OUTSIDER = caller("clinician", OTHER_SITE, "outsider")


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer):
    return create_app(live_settings(nats_server.url, tmp_path, database_url, smtp_sink, http_peer))


async def audit_of(app: Any, actor: str) -> list[tuple[str, str, str | None, str]]:
    async with app.state.runtime.sessions() as session:
        query = select(store.audit).where(store.audit.c.actor == actor).order_by(store.audit.c.id)
        return [
            (a["action"], a["site_id"], a["patient_id"], a["role"]) for a in (await session.execute(query)).mappings()
        ]


async def test_denied_reads_of_patient_data_are_audited_and_answer_like_unknown_ones(
    app, nats_server, bus: BusRecorder
) -> None:
    patient = Patient()
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await register_site(app, nats_server.url, OTHER_SITE)
        admin = caller("site_admin", SITE, "admin")
        assert (await client.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=admin)).status_code == 200
        await onboard(app, nats_server.url, patient)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        [alerted] = await bus.wait_for_event("CareTeamAlerted")
        alert_id = alerted.envelope()["data"]["alert_id"]

        # Another site's clinician: every door answers as for a record that does not exist.
        denied = await client.get(f"/patients/{patient.id}/notifications", headers=OUTSIDER)
        unknown = await client.get(f"/patients/{uuid4()}/notifications", headers=OUTSIDER)
        assert denied.status_code == unknown.status_code == 404
        assert denied.json() == unknown.json()
        assert (await client.get("/alerts", params={"site_id": SITE}, headers=OUTSIDER)).status_code == 404
        denied_alert = await client.get(f"/alerts/{alert_id}", headers=OUTSIDER)
        unknown_alert = await client.get(f"/alerts/{uuid4()}", headers=OUTSIDER)
        assert denied_alert.status_code == unknown_alert.status_code == 404
        assert denied_alert.json() == unknown_alert.json()
        assert (await client.post(f"/alerts/{alert_id}/acknowledge", headers=OUTSIDER)).status_code == 404
        # Their own sites' alerts: none, so nothing about a patient was read.
        assert (await client.get("/alerts", headers=OUTSIDER)).json() == []

        assert await audit_of(app, "outsider") == [
            ("notifications.read.denied", SITE, patient.id, "clinician"),
            ("alerts.read.denied", SITE, None, "clinician"),
            ("alert.read.denied", SITE, patient.id, "clinician"),
            ("alert.acknowledge.denied", SITE, patient.id, "clinician"),
        ]
        still = await client.get(f"/alerts/{alert_id}", headers=INSIDER)
        assert still.json()["status"] == "open"  # the denied acknowledgement changed nothing

        # The site's own clinician: each read is audited too.
        assert (await client.get(f"/patients/{patient.id}/notifications", headers=INSIDER)).status_code == 200
        assert len((await client.get("/alerts", params={"site_id": SITE}, headers=INSIDER)).json()) == 1
        assert (await client.post(f"/alerts/{alert_id}/acknowledge", headers=INSIDER)).status_code == 200
        assert await audit_of(app, "insider") == [
            ("alert.read", SITE, patient.id, "clinician"),
            ("notifications.read", SITE, patient.id, "clinician"),
            ("alerts.read", SITE, patient.id, "clinician"),
            ("alert.acknowledge", SITE, patient.id, "clinician"),
        ]
