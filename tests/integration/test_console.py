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
from typing import Any

import httpx

from iopnet.natsd import free_port
from services.console.app import create_app as console_app
from tests.conftest import auth, make_settings, running
from tests.console import OTHER, SITE, a_patient_with_an_enrollment, browser, csrf, sign_in
from tests.oidc import add_user


def crisis_tag(page: httpx.Response) -> str:
    found = re.search(r'<section id="crisis"[^>]*>', page.text)
    assert found, page.text
    return found.group(0)


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


async def test_the_console_serves_its_screens_while_the_bus_is_down(tmp_path) -> None:
    """No NATS at all: the screens answer at once; only /readyz says the feed is missing."""
    settings = make_settings(f"nats://127.0.0.1:{free_port()}", tmp_path, console_dev_signin=True)
    async with running(console_app(settings)) as console:
        assert (await console.get("/signin")).status_code == 200
        ready = await console.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"] == {"nats": False}
