"""Bad input never reaches scheduling's date arithmetic (issue 8 part 5): dates, site-local
wall times and ISO weeks outside what the service can compute with answer 422 with the
DESIGN A6 error object, and change nothing — against a real nats-server and a real
database (SQLite and PostgreSQL), through the HTTP API."""

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import func, select

from iopnet.testing import eventually
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import new_envelope
from shared.contracts.events import SiteRegistered
from tests.conftest import auth, make_settings, publish, running

SITE = "columbus-east"
TZ = "America/New_York"
ADMIN = auth("site_admin", [SITE])


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def with_site(app, nats_url: str) -> None:
    await publish(nats_url, new_envelope(SiteRegistered(name="Columbus East", timezone=TZ), site_id=SITE))

    async def known():
        async with app.state.runtime.sessions() as session:
            return await store.get_site(session, SITE)

    await eventually(known, what="site projected")


async def counts(app) -> dict[str, int]:
    """Rows per table: what a refused request must leave as it was."""
    async with app.state.runtime.sessions() as session:
        return {
            table.name: int((await session.execute(select(func.count()).select_from(table))).scalar_one())
            for table in store.metadata.sorted_tables
        }


def assert_invalid(response: httpx.Response, field: str) -> None:
    """422 with the A6 error object, naming the field (and never a bare 500)."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] == "invalid"
    assert field in body["error"]["fields"], body


async def test_calendar_days_outside_the_calendar_are_422(app, nats_server) -> None:
    async with running(app) as client:
        await with_site(app, nats_server.url)
        before = await counts(app)
        for query, field in (
            ("from=0001-01-01", "from"),
            ("from=9999-12-31", "from"),
            ("from=9999-12-25&to=9999-12-31", "from"),
            ("from=1999-12-31", "from"),
            ("from=2100-01-01", "from"),
            ("to=9999-12-31", "to"),
            ("to=0001-01-01", "to"),
            ("from=2026-13-01", "from"),
            ("from=2026-03-01&to=2026-02-01", "to"),  # backwards
            ("from=2026-01-01&to=2026-12-31", "to"),  # longer than 62 days
        ):
            assert_invalid(await client.get(f"/sites/{SITE}/sessions?{query}", headers=ADMIN), field)
        # The edges of the accepted calendar are computed without overflow.
        for query in ("from=2000-01-01", "from=2099-12-31", "from=2099-11-01&to=2099-12-31"):
            response = await client.get(f"/sites/{SITE}/sessions?{query}", headers=ADMIN)
            assert response.status_code == 200, (query, response.text)
        assert await counts(app) == before


async def test_hours_report_weeks_that_do_not_exist_are_422(app, nats_server) -> None:
    async with running(app) as client:
        await with_site(app, nats_server.url)
        before = await counts(app)
        for week in (
            "2026-W54",
            "0000-W01",
            "9999-W52",
            "2026-W00",
            "2027-W53",  # 2027 has 52 ISO weeks
            "1999-W52",
            "2100-W01",
            "2026-w07",
            "2026-W7",
            "\u0662\u0660\u0662\u0666-W07",  # Arabic-Indic digits: not an ISO week
        ):
            response = await client.get(f"/sites/{SITE}/hours-report", params={"week": week}, headers=ADMIN)
            assert_invalid(response, "week")
        for week in ("2026-W53", "2000-W01", "2099-W53"):  # long years have a W53; the edges compute
            response = await client.get(f"/sites/{SITE}/hours-report", params={"week": week}, headers=ADMIN)
            assert response.status_code == 200, (week, response.text)
            assert response.json()["iso_week"] == week
        assert await counts(app) == before


async def test_slots_outside_the_calendar_are_422_and_create_nothing(app, nats_server) -> None:
    async with running(app) as client:
        await with_site(app, nats_server.url)
        before = await counts(app)
        for starts_local in (
            "9999-12-31T22:00:00",
            "9999-12-31T23:59:59",
            "0001-01-01T00:00:00",
            "2100-01-01T09:00:00",
            "2099-12-31T09:00:00+00:00",  # a wall time carries no offset
            "2099-12-31T09:00:00Z",
        ):
            slot = {"site_id": SITE, "starts_local": starts_local, "minutes": 50}
            response = await client.post("/clinicians/tester/slots", json=slot, headers=ADMIN)
            assert_invalid(response, "starts_local")
        # sessions.clinician_id holds 200 characters: a longer id is refused before the insert.
        slot = {"site_id": SITE, "starts_local": "2099-12-31T09:00:00"}
        assert_invalid(await client.post(f"/clinicians/{'c' * 201}/slots", json=slot, headers=ADMIN), "clinician_id")
        assert await counts(app) == before
        # The last accepted evening: 22:00 New York plus 3 hours is 2100 in UTC, and computes.
        last = await client.post(
            "/clinicians/tester/slots", json={**slot, "starts_local": "2099-12-31T22:00:00", "minutes": 180},
            headers=ADMIN,
        )  # fmt: skip
        assert last.status_code == 201, last.text
        assert datetime.fromisoformat(last.json()["ends_at"]).year == 2100


async def test_closure_days_outside_the_calendar_are_422(app, nats_server) -> None:
    async with running(app) as client:
        await with_site(app, nats_server.url)
        before = await counts(app)
        for day in ("9999-12-31", "2100-01-01", "0001-01-01"):
            response = await client.post(
                f"/sites/{SITE}/closures", json={"date": day, "reason": "holiday"}, headers=ADMIN
            )
            assert_invalid(response, "date")
        assert await counts(app) == before
        tomorrow = datetime.now(ZoneInfo(TZ)).date() + timedelta(days=1)
        response = await client.post(
            f"/sites/{SITE}/closures", json={"date": str(tomorrow), "reason": "holiday"}, headers=ADMIN
        )
        assert response.status_code == 201, response.text
