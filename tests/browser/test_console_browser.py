"""The console in a real browser (issue 13): Playwright driving Debian's Chromium against
the console served on loopback, real intake and notifications, a real nats-server and a
real OpenID Connect provider, whose sign-in form the browser fills in.

A clinician signs in and keeps the alert inbox open; a patient, on a phone-sized screen in
a second browser context, ticks "I am worried about my safety" (the crisis resources show
at once, before anything is sent), sends the check-in, and the alert appears in the
clinician's inbox without a reload; the clinician acknowledges it. axe-core finds no
serious or critical accessibility violation on either screen. Screenshots go to
docs/console/ (the README shows them)."""

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import auth
from tests.console import CONSOLE, a_patient_with_an_enrollment
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
