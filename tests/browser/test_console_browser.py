"""The console in a real browser (issue 13): Playwright driving Debian's Chromium against
the console served on loopback, real intake and notifications, a real nats-server and a
real OpenID Connect provider, whose sign-in form the browser fills in.

A clinician signs in and keeps the alert inbox open; a patient, on a phone-sized screen in
a second browser context, ticks "I am worried about my safety" (the crisis resources show
at once, before anything is sent), sends the check-in, and the alert appears in the
clinician's inbox without a reload; the clinician acknowledges it. axe-core finds no
serious or critical accessibility violation on either screen. Screenshots go to
docs/console/ (the README shows them)."""

import re
import shutil
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from iopnet.testing import eventually
from shared import clock
from tests.conftest import auth
from tests.console import CONSOLE, a_patient_with_an_enrollment, a_site_with_a_program
from tests.oidc import add_user

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
PHONE = {"width": 390, "height": 844}
SITE, OTHER = "columbus-east", "dayton-north"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def sign_in(page: Page, sub: str) -> None:
    """As a person would: the console's sign-in button, the provider's form, back."""
    await page.goto(f"{CONSOLE}/signin")
    await page.get_by_role("link", name="Sign in with your organization").click()
    await page.fill("input[name=sub]", sub)
    await page.get_by_role("button", name="Authorize").click()
    await page.wait_for_url(f"{CONSOLE}/**")


async def serious_violations(page: Page) -> list[dict[str, Any]]:
    results = await Axe().run(page)
    return [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]


async def test_an_urgent_check_in_appears_live_in_the_clinicians_inbox(
    browser: Browser, network: dict[str, Any], issuer: str
) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    add_user(issuer, "dr.rivera", iopnet_role="clinician", iopnet_sites=[SITE])
    add_user(issuer, "ada", iopnet_role="patient", iopnet_patient_id=patient_id)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    clinician = await (await browser.new_context()).new_page()
    await sign_in(clinician, "dr.rivera")
    await expect(clinician.get_by_role("heading", name="Open alerts, newest first")).to_be_visible()
    await expect(clinician.get_by_text("No open alerts.")).to_be_visible()
    assert await serious_violations(clinician) == []

    patient = await (await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)).new_page()
    await sign_in(patient, "ada")
    crisis = patient.locator("#crisis")
    await expect(crisis).to_be_hidden()
    assert await serious_violations(patient) == []
    await patient.screenshot(path=SCREENSHOTS / "patient-check-in.png", full_page=True)
    await patient.fill("#mood", "2")
    await patient.fill("#craving", "9")
    await patient.check("#safety")
    await expect(crisis).to_be_visible()  # at once, before anything is sent
    await expect(crisis.get_by_role("link", name="988")).to_be_visible()
    await patient.screenshot(path=SCREENSHOTS / "patient-safety.png", full_page=True)

    sent = time.monotonic()
    await patient.get_by_role("button", name="Send check-in").click()
    row = clinician.locator("tr.alert", has_text="Ada Okafor")
    await expect(row).to_be_visible(timeout=15_000)  # no reload: the inbox listens
    shown_after = time.monotonic() - sent
    print(f"\nurgent check-in sent -> alert shown in the clinician's inbox: {1000 * shown_after:.0f} ms")
    await expect(patient.get_by_text("Your check-in was received.")).to_be_visible()
    await expect(crisis).to_be_visible()
    await clinician.screenshot(path=SCREENSHOTS / "alerts-inbox.png", full_page=True)
    assert await serious_violations(clinician) == []

    await row.get_by_role("button", name="Acknowledge").click()
    await expect(clinician.get_by_text("No open alerts.")).to_be_visible()
    alert = await network["notify"].get("/alerts", params={"status": "acknowledged"}, headers=auth("clinician", [SITE]))
    assert [a["acknowledged_by"] for a in alert.json()] == ["dr.rivera"]

    # The patient's page in Spanish.
    await patient.get_by_role("link", name="Español").click()
    await expect(patient.get_by_role("heading", name="Registro de hoy")).to_be_visible()
    await patient.screenshot(path=SCREENSHOTS / "patient-check-in-es.png", full_page=True)


async def reloaded_until_visible(page: Page, locator: Locator, what: str) -> None:
    """Bookings are made by scheduling after the enrollment's event: reload until shown."""

    async def shown() -> bool:
        await page.reload()
        return await locator.count() > 0

    await eventually(shown, what=what)


async def test_the_front_desk_registers_a_patient_enrolls_them_and_sees_the_bookings(
    browser: Browser, network: dict[str, Any], issuer: str
) -> None:
    await a_site_with_a_program(network)
    add_user(issuer, "desk.lee", iopnet_role="front_desk", iopnet_sites=[SITE])
    desk = await (await browser.new_context()).new_page()
    await sign_in(desk, "desk.lee")
    await expect(desk.get_by_role("heading", name="Today's sessions")).to_be_visible()
    await expect(desk.get_by_role("heading", name=re.compile("Evening group"))).to_be_visible()
    await desk.screenshot(path=SCREENSHOTS / "today.png", full_page=True)
    assert await serious_violations(desk) == []

    await desk.get_by_role("link", name="Patients").click()
    await desk.get_by_role("link", name="Register a patient").click()
    person = {
        "Given name": "Rosa",
        "Family name": "Delgado",
        "Date of birth": "1988-04-12",
        "Email": "rosa@example.org",
    }
    for label, value in person.items():
        await desk.get_by_label(label, exact=True).fill(value)
    await desk.get_by_label("Reminders by").select_option("email")
    assert await serious_violations(desk) == []
    await desk.screenshot(path=SCREENSHOTS / "register.png", full_page=True)
    await desk.get_by_role("button", name="Register").click()
    await expect(desk.get_by_role("heading", name="Rosa Delgado")).to_be_visible()
    record_url = desk.url

    # Not enrolled yet: the enrollment form is open.
    await desk.get_by_label("Referred by").select_option("physician")
    await desk.get_by_role("button", name="Enroll").click()
    await expect(desk.locator("article.episode", has_text="active")).to_be_visible()
    await reloaded_until_visible(desk, desk.locator("tr.booking", has_text="Evening group"), "the bookings")
    assert await serious_violations(desk) == []
    await desk.screenshot(path=SCREENSHOTS / "patient-record.png", full_page=True)

    # The same person again: the duplicate warning, with the record it may be.
    await desk.goto(f"{CONSOLE}/patients/new")
    for label, value in person.items():
        await desk.get_by_label(label, exact=True).fill(value)
    await desk.get_by_role("button", name="Register").click()
    warning = desk.locator("#duplicate")
    await expect(warning).to_be_visible()
    await expect(desk.get_by_label("I checked: this is a different person")).to_be_visible()
    assert await serious_violations(desk) == []
    await desk.screenshot(path=SCREENSHOTS / "duplicate-warning.png", full_page=True)
    await warning.get_by_role("link", name="Open the record").click()
    assert desk.url == record_url


async def test_a_clinician_records_attendance_and_a_site_admin_runs_the_site(
    browser: Browser, network: dict[str, Any], issuer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    for mood, craving in ((3, 8), (5, 6), (6, 4), (8, 2)):
        check_in = {"mood": mood, "craving": craving, "used_since_last": False, "safety_concern": False}
        headers = auth("patient", patient_id=patient_id)
        assert (
            await network["desk"].post(f"/patients/{patient_id}/check-ins", json=check_in, headers=headers)
        ).is_success
    add_user(issuer, "dr.rivera", iopnet_role="clinician", iopnet_sites=[SITE])
    add_user(issuer, "dr.other", iopnet_role="clinician", iopnet_sites=[OTHER])
    add_user(issuer, "admin.kim", iopnet_role="site_admin", iopnet_sites=[SITE])
    add_user(issuer, "net.ops", iopnet_role="network_admin")

    clinician = await (await browser.new_context()).new_page()
    await sign_in(clinician, "dr.rivera")
    await clinician.goto(f"{CONSOLE}/today")
    await reloaded_until_visible(clinician, clinician.get_by_role("link", name="Ada Okafor"), "today's roster")
    [tonight] = (await network["calendar"].get(f"/sites/{SITE}/sessions", headers=auth("clinician", [SITE]))).json()
    started = datetime.fromisoformat(tonight["starts_at"]) + timedelta(minutes=5)
    monkeypatch.setattr(clock, "now", lambda: started)  # the services' one clock: five minutes into the session
    await clinician.reload()
    late = clinician.get_by_role("button", name="Late: Ada Okafor")
    await late.click()  # one tap; htmx swaps the session's card
    await expect(late).to_have_attribute("aria-pressed", "true")
    await expect(clinician.locator("td.attendance", has_text="Late")).to_be_visible()
    assert await serious_violations(clinician) == []
    await clinician.screenshot(path=SCREENSHOTS / "today-attendance.png", full_page=True)
    monkeypatch.undo()

    await clinician.get_by_role("link", name="Ada Okafor").click()
    await expect(clinician.get_by_role("img", name=re.compile("Mood"))).to_be_visible()  # the trend chart
    assert await clinician.locator("#check-ins tbody tr").count() == 4
    assert await serious_violations(clinician) == []
    await clinician.screenshot(path=SCREENSHOTS / "patient-trend.png", full_page=True)

    # Site walls: a clinician of another site gets no record, no roster, no name.
    other = await (await browser.new_context()).new_page()
    await sign_in(other, "dr.other")
    await other.goto(f"{CONSOLE}/patients/{patient_id}")
    await expect(other.get_by_role("heading", name="Something went wrong.")).to_be_visible()
    assert "Ada" not in await other.content()
    await other.goto(f"{CONSOLE}/today?site={SITE}")
    assert "Ada" not in await other.content() and "Evening group" not in await other.content()

    admin = await (await browser.new_context()).new_page()
    await sign_in(admin, "admin.kim")
    await admin.goto(f"{CONSOLE}/patients/{patient_id}")
    await expect(admin.get_by_role("heading", name="Audit trail")).to_be_visible()
    await expect(admin.locator("tr.audit-row", has_text="dr.rivera").first).to_be_visible()
    await admin.get_by_role("link", name="Programs").click()
    await admin.get_by_text("Weekly template: Publish program").click()
    await admin.get_by_label("Program name").fill("Adolescent afternoons")
    await admin.get_by_label("Title 1", exact=True).fill("Skills group")
    await admin.get_by_label("Day 1", exact=True).select_option("2")
    await admin.get_by_role("button", name="Publish program").click()
    await expect(admin.locator("article.program", has_text="Skills group")).to_be_visible()
    await expect(admin.get_by_role("heading", name=re.compile("Hours report"))).to_be_visible()
    assert await serious_violations(admin) == []
    await admin.screenshot(path=SCREENSHOTS / "programs.png", full_page=True)
    await admin.get_by_role("link", name="Settings").click()
    await admin.get_by_label("Name", exact=True).fill("Nurse Park")
    await admin.get_by_label("Channel").select_option("sms")
    await admin.get_by_label("Address (email or +1 phone)").fill("+16145550199")
    await admin.get_by_role("button", name="Add to the care team").click()
    await expect(admin.locator("ol.team li", has_text="Nurse Park")).to_be_visible()
    assert await serious_violations(admin) == []
    await admin.screenshot(path=SCREENSHOTS / "settings.png", full_page=True)

    network_admin = await (await browser.new_context()).new_page()
    await sign_in(network_admin, "net.ops")
    await network_admin.get_by_role("link", name="Network").click()
    await expect(network_admin.locator("tr.site", has_text=SITE)).to_be_visible()
    assert await serious_violations(network_admin) == []
    await network_admin.get_by_role("link", name="Español").click()
    await expect(network_admin.get_by_role("heading", name="Sedes")).to_be_visible()
    await network_admin.screenshot(path=SCREENSHOTS / "network-es.png", full_page=True)
