"""The console's test network (issue 13), shared by the console's integration and browser
tests: intake, scheduling and notifications in-process on a real nats-server, a real
OpenID Connect provider (oidc-provider-mock) and the console served by uvicorn on
loopback, with helpers that sign in as a browser does and set up a site, a program and
an enrolled patient through the services' own APIs."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from iopnet.natsd import free_port
from iopnet.testing import eventually
from services.console.app import create_app as console_app
from services.intake.app import create_app as intake_app
from services.notifications.app import create_app as notifications_app
from services.scheduling.app import create_app as scheduling_app
from tests.conftest import auth, make_settings, running
from tests.oidc import oidc_provider

SITE, OTHER = "columbus-east", "dayton-north"
# Served by uvicorn on loopback (server-sent events need a real server: httpx's ASGI
# transport buffers whole answers). localhost: plain-http cookies (elsewhere Secure).
CONSOLE_PORT = free_port()
CONSOLE = f"http://localhost:{CONSOLE_PORT}"
ROSTER = {
    "members": [{"name": "Dr. On Call", "role": "clinician", "channel": "email", "address": "oncall@clinic.test"}]
}


class ServiceRouter(httpx.AsyncBaseTransport):
    """The console's calls to the services, delivered to the in-process apps by port."""

    def __init__(self, apps: dict[int, FastAPI]) -> None:
        self.transports = {port: httpx.ASGITransport(app=app) for port, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.transports.get(request.url.port or 80)
        if transport is None:  # a service this test does not run (scheduling)
            raise httpx.ConnectError("connection refused", request=request)
        return await transport.handle_async_request(request)


@pytest.fixture
def issuer() -> Iterator[str]:
    with oidc_provider() as url:
        yield url


@pytest.fixture
async def network(nats_server, issuer: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    ports = {"intake_port": free_port(), "notifications_port": free_port(), "scheduling_port": free_port()}
    common = {"oidc_issuer": issuer, **ports}
    intake = intake_app(make_settings(nats_server.url, tmp_path / "i", **common))
    scheduling = scheduling_app(make_settings(nats_server.url, tmp_path / "s", **common))
    notifications = notifications_app(make_settings(nats_server.url, tmp_path / "n", **common))
    console = console_app(
        # The mock provider authenticates every client with a secret (any will do).
        make_settings(
            nats_server.url, tmp_path / "c", console_public_url=CONSOLE, oidc_client_secret="any-secret", **common
        )
    )
    apps = {
        ports["intake_port"]: intake,
        ports["scheduling_port"]: scheduling,
        ports["notifications_port"]: notifications,
    }
    console.state.backend.http = httpx.AsyncClient(transport=ServiceRouter(apps))
    server = uvicorn.Server(uvicorn.Config(console, host="127.0.0.1", port=CONSOLE_PORT, log_level="warning"))
    async with running(intake) as desk, running(scheduling) as calendar, running(notifications) as notify:
        serving = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: _now(server.started), what="the console serving")
            await eventually(lambda: _now(console.state.alerts.connected), what="the console's alert feed")
            yield {"desk": desk, "calendar": calendar, "notify": notify, "console": console, "nats": nats_server.url}
        finally:
            server.should_exit = True
            await serving


async def _now(value: bool) -> bool:
    return value


def browser(console: FastAPI) -> httpx.AsyncClient:
    """A browser: its own cookies, following redirects between the console and the provider."""
    return httpx.AsyncClient(base_url=CONSOLE, follow_redirects=True, timeout=10)


async def sign_in(client: httpx.AsyncClient, sub: str) -> httpx.Response:
    """Through the provider: its form posted as the user would, then back to the console."""
    form = await client.get("/signin/provider")
    assert form.status_code == 200 and "localhost" in str(form.url), form.url
    landed = await client.post(str(form.url), data={"sub": sub})
    assert str(landed.url).startswith(CONSOLE), landed.url
    return landed


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text) or re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def a_morning_zone() -> tuple[str, datetime]:
    """A time zone where it is morning now, and the time there: its programs have sessions
    later today, whenever the test runs."""
    now = datetime.now(UTC)
    for hours in range(-12, 15):
        local = now + timedelta(hours=hours)
        if 5 <= local.hour < 12:
            return ("Etc/GMT" + (f"{-hours:+d}" if hours else "")), local.replace(tzinfo=None)
    raise AssertionError("every hour of the day is somewhere")


async def a_site_with_a_program(net: dict[str, Any]) -> tuple[str, date]:
    """Two sites (SITE in a zone where it is morning), the care team, and a program that
    scheduling publishes with a group session tonight: its id and the site's today."""
    desk, calendar, notify = net["desk"], net["calendar"], net["notify"]
    zone, local = a_morning_zone()
    for site_id in (SITE, OTHER):
        site = {"site_id": site_id, "name": site_id.replace("-", " ").title(), "timezone": zone}
        assert (await desk.post("/sites", json=site, headers=auth("network_admin"))).status_code == 201
    block = {"weekday": local.isoweekday(), "start": "20:00", "minutes": 60, "kind": "group_therapy",
             "title": "Evening group", "capacity": 12}  # fmt: skip
    program = {"site_id": SITE, "name": "Adult IOP evenings", "cohort": "adult", "blocks": [block]}
    published: list[str] = []

    async def program_published() -> bool:
        answer = await calendar.post("/programs", json=program, headers=auth("site_admin", [SITE]))
        if answer.status_code == 201:
            published.append(answer.json()["program_id"])
        return bool(published)

    await eventually(program_published, what="scheduling to know the site")

    async def roster_set() -> bool:
        answer = await notify.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=auth("site_admin", [SITE]))
        return answer.status_code == 200

    await eventually(roster_set, what="notifications to know the site")
    return published[0], local.date()


async def a_patient_with_an_enrollment(net: dict[str, Any]) -> str:
    desk = net["desk"]
    program_id, today = await a_site_with_a_program(net)
    person = {"site_id": SITE, "given_name": "Ada", "family_name": "Okafor", "birth_date": "1990-02-02",
              "email": "ada@example.org", "preferred_channel": "email"}  # fmt: skip
    patient_id = str(
        (await desk.post("/patients", json=person, headers=auth("front_desk", [SITE]))).json()["patient_id"]
    )
    enrollment = {"program_id": program_id, "level_of_care": "2.1", "cohort": "adult",
                  "start_date": str(today), "referral_source": "self"}  # fmt: skip

    async def enrolled() -> bool:
        answer = await desk.post(
            f"/patients/{patient_id}/enrollments", json=enrollment, headers=auth("front_desk", [SITE])
        )
        return answer.status_code == 201

    await eventually(enrolled, what="intake to know the program")
    return patient_id
