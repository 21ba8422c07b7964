"""One trace follows an urgent check-in from intake's HTTP request through its outbox, the
bus and notifications' handler to the CareTeamAlerted it causes (shared/tracing.py), with
intake and notifications running in this process on a real nats-server and SQLite. The
spans go to an in-memory exporter; their parent links are what is checked."""

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from iopnet.testing import eventually
from services.intake.app import create_app as intake_app
from services.notifications.app import create_app as notifications_app
from shared.tracing import install
from tests.conftest import auth, fresh_postgres_database, make_settings, program_published, publish, running

SITE = "columbus-east"
ADMIN = auth("network_admin")
DESK = auth("front_desk", [SITE])
ROSTER = {
    "members": [{"name": "Dr. On Call", "role": "clinician", "channel": "email", "address": "oncall@clinic.test"}]
}


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process's tracer provider (OpenTelemetry allows one per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = install(TracerProvider())
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def one(spans: list[ReadableSpan], kind: SpanKind, name_part: str) -> ReadableSpan:
    matching = [s for s in spans if s.kind == kind and name_part in s.name]
    assert len(matching) == 1, [(s.name, s.kind) for s in spans]
    return matching[0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """Intake's and notifications' databases, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'i.db'}", f"sqlite+aiosqlite:///{tmp_path / 'n.db'}"
        return
    async with fresh_postgres_database() as intake, fresh_postgres_database() as notifications:
        yield intake, notifications


async def test_a_check_in_is_one_trace_from_the_request_to_the_care_team_alert(
    spans: InMemorySpanExporter, nats_server, tmp_path: Path, databases: tuple[str, str]
) -> None:
    spans.clear()
    intake_url, notifications_url = databases
    intake = intake_app(make_settings(nats_server.url, tmp_path / "i", intake_database_url=intake_url))
    notifications = notifications_app(
        make_settings(nats_server.url, tmp_path / "n", notifications_database_url=notifications_url)
    )
    async with running(intake) as desk, running(notifications) as notify:
        site = {"site_id": SITE, "name": "Columbus East", "timezone": "America/New_York"}
        assert (await desk.post("/sites", json=site, headers=ADMIN)).status_code == 201
        await publish(nats_server.url, program_published(SITE, f"{SITE}-adult"))

        async def roster_set() -> bool:
            response = await notify.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=auth("site_admin", [SITE]))
            return response.status_code == 200

        await eventually(roster_set, what="notifications to know the site")
        patient = {"site_id": SITE, "given_name": "Ada", "family_name": "Okafor", "birth_date": "1990-02-02",
                   "email": "ada@example.org", "preferred_channel": "email"}  # fmt: skip
        patient_id = (await desk.post("/patients", json=patient, headers=DESK)).json()["patient_id"]
        enrollment = {"program_id": f"{SITE}-adult", "level_of_care": "2.1", "cohort": "adult",
                      "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip

        async def enrolled() -> bool:
            response = await desk.post(f"/patients/{patient_id}/enrollments", json=enrollment, headers=DESK)
            assert response.status_code in (201, 422), response.text  # 422: the program is not known yet
            return response.status_code == 201

        await eventually(enrolled, what="intake to know the program")
        spans.clear()
        urgent = {"mood": 2, "craving": 9, "used_since_last": True, "safety_concern": True, "sleep_hours": 3}
        me = auth("patient", [], patient_id)
        response = await desk.post(f"/patients/{patient_id}/check-ins", json=urgent, headers=me)
        assert response.json()["risk"] == "urgent"

        async def alert_published() -> bool:
            return any("care_team_alerted" in s.name for s in spans.get_finished_spans())

        await eventually(alert_published, what="CareTeamAlerted published")
        # A search by name: the query reaches the trace as its keys only.
        assert (await desk.get("/patients?name=Okafor&birth_date=1990-02-02", headers=DESK)).status_code == 200

    finished = list(spans.get_finished_spans())
    request = one(finished, SpanKind.SERVER, "POST /patients/{patient_id}/check-ins")
    submitted = one(finished, SpanKind.PRODUCER, "iop.intake.check_in_submitted")
    # Applied once: by notifications' safety lane, which alerts (intake's feed lane lies
    # dormant: no consent-based integration).
    consumed = {
        str((s.attributes or {}).get("messaging.consumer.group.name")): s
        for s in finished
        if s.kind == SpanKind.CONSUMER and s.name == "CheckInSubmitted process"
    }
    assert set(consumed) == {"notifications-IOP_INTAKE-safety"}
    handled = consumed["notifications-IOP_INTAKE-safety"]
    alerted = one(finished, SpanKind.PRODUCER, "iop.notifications.care_team_alerted")
    # Request -> (outbox row) -> publish -> (message headers) -> handler -> (outbox row) -> publish.
    assert submitted.parent is not None and submitted.parent.span_id == request.context.span_id
    assert handled.parent is not None and handled.parent.span_id == submitted.context.span_id
    assert alerted.parent is not None and alerted.parent.span_id == handled.context.span_id
    assert len({s.context.trace_id for s in (request, submitted, handled, alerted)}) == 1
    assert request.attributes is not None and request.attributes["http.route"] == "/patients/{patient_id}/check-ins"
    search = one(finished, SpanKind.SERVER, "GET /patients")
    assert search.attributes is not None and search.attributes["url.query"] == "name=REDACTED&birth_date=REDACTED"
    # Ids and names only: nothing of the patient's answers or identity in any span.
    for span in finished:
        assert "Okafor" not in str(span.to_json()) and "ada@example.org" not in str(span.to_json())
