"""The console (issue 13), in-process against real services, a real nats-server and a real
OpenID Connect provider: a clinician and a patient sign in through the provider as a
browser does (redirects, the provider's form, the callback with PKCE); the patient's
urgent check-in shows the crisis resources and reaches the clinician's inbox live, over
server-sent events fed from CareTeamAlerted; the clinician acknowledges it. Plus what the
browser is protected by: cookie flags, CSRF on every form, the security headers, and a
clinician of another site who sees nothing."""

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import date
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
from tests.conftest import auth, make_settings, program_published, publish, running
from tests.oidc import add_user, oidc_provider

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
    notifications = notifications_app(make_settings(nats_server.url, tmp_path / "n", **common))
    console = console_app(
        # The mock provider authenticates every client with a secret (any will do).
        make_settings(
            nats_server.url, tmp_path / "c", console_public_url=CONSOLE, oidc_client_secret="any-secret", **common
        )
    )
    console.state.backend.http = httpx.AsyncClient(
        transport=ServiceRouter({ports["intake_port"]: intake, ports["notifications_port"]: notifications})
    )
    server = uvicorn.Server(uvicorn.Config(console, host="127.0.0.1", port=CONSOLE_PORT, log_level="warning"))
    async with running(intake) as desk, running(notifications) as notify:
        serving = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: _now(server.started), what="the console serving")
            yield {"desk": desk, "notify": notify, "console": console, "nats": nats_server.url}
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


def crisis_tag(page: httpx.Response) -> str:
    found = re.search(r'<section id="crisis"[^>]*>', page.text)
    assert found, page.text
    return found.group(0)


def csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text) or re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def a_patient_with_an_enrollment(net: dict[str, Any]) -> str:
    desk, notify = net["desk"], net["notify"]
    for site_id in (SITE, OTHER):
        site = {"site_id": site_id, "name": site_id.title(), "timezone": "America/New_York"}
        assert (await desk.post("/sites", json=site, headers=auth("network_admin"))).status_code == 201
    await publish(net["nats"], program_published(SITE, f"{SITE}-adult"))

    async def roster_set() -> bool:
        answer = await notify.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=auth("site_admin", [SITE]))
        return answer.status_code == 200

    await eventually(roster_set, what="notifications to know the site")
    person = {"site_id": SITE, "given_name": "Ada", "family_name": "Okafor", "birth_date": "1990-02-02",
              "email": "ada@example.org", "preferred_channel": "email"}  # fmt: skip
    patient_id = str(
        (await desk.post("/patients", json=person, headers=auth("front_desk", [SITE]))).json()["patient_id"]
    )
    enrollment = {"program_id": f"{SITE}-adult", "level_of_care": "2.1", "cohort": "adult",
                  "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip

    async def enrolled() -> bool:
        answer = await desk.post(
            f"/patients/{patient_id}/enrollments", json=enrollment, headers=auth("front_desk", [SITE])
        )
        return answer.status_code == 201

    await eventually(enrolled, what="intake to know the program")
    return patient_id


async def first_alert_event(client: httpx.AsyncClient, seen: asyncio.Event, at: list[float]) -> None:
    async with client.stream("GET", "/alerts/stream") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        seen.set()  # connected
        async for line in stream.aiter_lines():
            if line.startswith("event: alert"):
                at.append(time.monotonic())
                return


async def test_an_urgent_check_in_reaches_the_clinicians_inbox_live(network: dict[str, Any], issuer: str) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    add_user(issuer, "dr.rivera", iopnet_role="clinician", iopnet_sites=[SITE])
    add_user(issuer, "dr.other", iopnet_role="clinician", iopnet_sites=[OTHER])
    add_user(issuer, "ada", iopnet_role="patient", iopnet_patient_id=patient_id)
    console = network["console"]
    async with browser(console) as clinician, browser(console) as patient, browser(console) as elsewhere:
        inbox = await sign_in(clinician, "dr.rivera")
        assert inbox.url.path == "/alerts" and "No open alerts" in inbox.text
        cookie = next(h for k, h in inbox.history[-1].headers.multi_items() if k == "set-cookie")
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert "default-src 'self'" in inbox.headers["content-security-policy"]
        assert inbox.headers["cache-control"] == "no-store"
        assert (await sign_in(elsewhere, "dr.other")).url.path == "/alerts"

        connected, arrived = asyncio.Event(), []
        listening = asyncio.create_task(first_alert_event(clinician, connected, arrived))
        await asyncio.wait_for(connected.wait(), 10)

        page = await sign_in(patient, "ada")
        assert page.url.path == "/me" and "988" in page.text  # the crisis resources are on the page
        assert " hidden" in crisis_tag(page)  # shown by the page's script the moment the box is ticked
        urgent = {"csrf": csrf(page), "mood": "2", "craving": "9", "used_since_last": "true",
                  "safety_concern": "true", "sleep_hours": "3", "note": "rough night"}  # fmt: skip
        assert (await patient.post("/me/check-ins", data={**urgent, "csrf": "forged"})).status_code == 403
        sent_at = time.monotonic()
        answered = await patient.post("/me/check-ins", data=urgent)
        assert answered.status_code == 200 and "Your check-in was received" in answered.text
        assert " hidden" not in crisis_tag(answered)  # shown, whatever happened to the request
        assert "tel:988" in answered.text

        await asyncio.wait_for(listening, 20)
        print(f"\nurgent check-in -> clinician's inbox event: {1000 * (arrived[0] - sent_at):.0f} ms")
        listed = await clinician.get("/alerts/list")
        assert "Ada Okafor" in listed.text and "urgent" in listed.text
        assert "Ada Okafor" not in (await elsewhere.get("/alerts/list")).text  # another site's clinician

        alert_id = re.search(r'data-alert-id="([^"]+)"', listed.text)
        assert alert_id
        inbox = await clinician.get("/alerts")
        done = await clinician.post(f"/alerts/{alert_id.group(1)}/acknowledge", data={"csrf": csrf(inbox)})
        assert done.status_code == 200 and "No open alerts" in done.text
        alert = await network["notify"].get(f"/alerts/{alert_id.group(1)}", headers=auth("clinician", [SITE]))
        assert alert.json()["status"] == "acknowledged" and alert.json()["acknowledged_by"] == "dr.rivera"

        # Signed out: the inbox needs a new sign-in.
        assert (await clinician.post("/signout", data={"csrf": csrf(inbox)})).url.path == "/signin"
        assert (await clinician.get("/alerts")).url.path == "/signin"


async def test_the_development_sign_in_is_off_unless_turned_on(network: dict[str, Any]) -> None:
    async with browser(network["console"]) as client:
        page = await client.get("/signin")
        assert "Development sign-in" not in page.text
        answer = await client.post("/signin/dev", data={"csrf": csrf(page), "sub": "demo-network-admin"})
        assert answer.status_code == 403
        assert (await client.get("/alerts")).url.path == "/signin"
