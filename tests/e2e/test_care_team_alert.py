"""Notifications end to end: the three services as separate processes, live channels
pointed at a real SMTP server (aiosmtpd) in the test process.

- An urgent check-in submitted at intake reaches the on-call clinician's mailbox; the
  test prints the time from check-in accepted (intake's 201) to mail received. Left
  unacknowledged, the alert escalates to the next person on the roster.
- Bookings made by scheduling become reminders in the site's time, the early one moved
  out of the site's quiet hours; they survive a kill -9 and restart of the notifications
  process, a consent revocation at intake stops them, and so does a discharge.

Run with `-s` to see the latency line."""

import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from iopnet.testing import eventually
from tests.conftest import SmtpSink, auth

SITE = "columbus-east"
TZ = "America/New_York"
ON_CALL, BACKUP = "oncall@clinic.test", "backup@clinic.test"
NAMES = ("Marguerite", "Okonkwo-Bell")


@pytest.fixture(autouse=True)
def live_notifications(monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink) -> None:
    """The service processes inherit the environment: live channels to the test's SMTP
    server, quiet and business hours off by default (a site sets its own), and an
    escalation time of a few seconds so it can be seen happen."""
    env = {
        "IOPNET_NOTIFY_LIVE_CHANNELS": "true",
        "IOPNET_SMTP_HOST": "127.0.0.1",
        "IOPNET_SMTP_PORT": str(smtp_sink.port),
        "IOPNET_SMTP_FROM": "iopnet <no-reply@iopnet.test>",
        "IOPNET_NOTIFY_QUIET_START": "00:00",
        "IOPNET_NOTIFY_QUIET_END": "00:00",
        "IOPNET_NOTIFY_BUSINESS_START": "00:00",
        "IOPNET_NOTIFY_BUSINESS_END": "00:00",
        "IOPNET_NOTIFY_BUSINESS_DAYS": "[1,2,3,4,5,6,7]",
        "IOPNET_NOTIFY_ESCALATION_MINUTES": "0.05",
        "IOPNET_NOTIFY_ESCALATION_CHECK_SECONDS": "0.5",
        "IOPNET_NOTIFY_RETRY_BASE_SECONDS": "0.2",
        # A deployment's default, stated: webhooks to http or internal targets are refused
        # (the rosters here use email, so no local webhook receiver is needed).
        "IOPNET_NOTIFY_ALLOW_INSECURE_TARGETS": "false",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


async def set_up_site(http: httpx.AsyncClient, network: Any, quiet: tuple[str, str] | None = None) -> None:
    admin = auth("network_admin")
    site = {"site_id": SITE, "name": "Columbus East", "timezone": TZ}
    assert (await http.post(f"{network.url('intake')}/sites", json=site, headers=admin)).status_code == 201
    roster = {
        "members": [
            {"name": "Dr. On Call", "role": "clinician", "channel": "email", "address": ON_CALL},
            {"name": "Dr. Backup", "role": "clinician", "channel": "email", "address": BACKUP},
        ]
    }
    notifications = network.url("notifications")

    async def roster_set():
        response = await http.put(f"{notifications}/sites/{SITE}/care-team", json=roster, headers=admin)
        assert response.status_code in (200, 404), response.text
        return response.status_code == 200

    await eventually(roster_set, timeout=20, what="notifications to learn the site")
    if quiet is not None:
        body = {"quiet_start": quiet[0], "quiet_end": quiet[1]}
        response = await http.put(f"{notifications}/sites/{SITE}/notification-settings", json=body, headers=admin)
        assert response.status_code == 200, response.text


async def internal_targets_are_refused(http: httpx.AsyncClient, network: Any) -> None:
    """The report's server-side request forgery, against the real processes: webhooks to
    our own services, loopback and the metadata endpoint answer 422 and change nothing."""
    notifications, admin = network.url("notifications"), auth("site_admin", [SITE])
    before = (await http.get(f"{notifications}/sites/{SITE}/care-team", headers=admin)).json()
    for url in (
        f"{network.url('intake')}/sites",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:22/",
        f"http://localhost:{network.settings.embedded_nats_port}/",
    ):
        hook = {"site_id": SITE, "url": url, "events": ["CareTeamAlerted"], "secret": "whsec-" + "e" * 24}
        refused = await http.post(f"{notifications}/subscriptions", json=hook, headers=auth("integration", [SITE]))
        assert refused.status_code == 422, (url, refused.text)
        assert refused.json()["error"]["code"] == "invalid"
        pager = {"name": "Pager", "role": "pager", "channel": "webhook", "address": url, "secret": hook["secret"]}
        roster = {"members": [*before["members"], pager]}
        assert (
            await http.put(f"{notifications}/sites/{SITE}/care-team", json=roster, headers=admin)
        ).status_code == 422
    assert (await http.get(f"{notifications}/subscriptions", headers=auth("integration", [SITE]))).json() == []
    assert (await http.get(f"{notifications}/sites/{SITE}/care-team", headers=admin)).json() == before


async def publish_program(http: httpx.AsyncClient, network: Any, weekday: int) -> str:
    block = {"weekday": weekday, "start": "09:00", "minutes": 60, "kind": "group_therapy", "title": "Morning group"}
    body = {"site_id": SITE, "name": "Adult IOP", "track": "morning", "cohort": "adult", "blocks": [block]}

    async def published():
        response = await http.post(
            f"{network.url('scheduling')}/programs", json=body, headers=auth("site_admin", [SITE])
        )
        return response if response.status_code == 201 else None

    return str((await eventually(published, timeout=20, what="scheduling to know the site")).json()["program_id"])


async def enrolled_patient(
    http: httpx.AsyncClient, network: Any, program_id: str, email: str, names: tuple[str, str] = NAMES
) -> tuple[str, str]:
    intake, desk = network.url("intake"), auth("front_desk", [SITE])
    patient = {
        "site_id": SITE, "given_name": names[0], "family_name": names[1], "birth_date": "1988-08-08",
        "email": email, "preferred_channel": "email", "language": "en",
    }  # fmt: skip
    created = await http.post(f"{intake}/patients", json=patient, headers=desk)
    assert created.status_code == 201, created.text
    patient_id = created.json()["patient_id"]
    enrollment = {"program_id": program_id, "level_of_care": "2.1", "cohort": "adult",
                  "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip

    async def enrolled():
        response = await http.post(f"{intake}/patients/{patient_id}/enrollments", json=enrollment, headers=desk)
        return response if response.status_code == 201 else None

    enrollment_id = (await eventually(enrolled, timeout=20, what="intake to know the program")).json()["enrollment_id"]
    return patient_id, enrollment_id


async def grant_consent(http: httpx.AsyncClient, network: Any, patient_id: str) -> str:
    consent = {
        "recipient": "org:iopnet-notifications",
        "purpose": "appointment_reminders",
        "information": "Appointment times",
        "expires_on": str(date.today() + timedelta(days=90)),
        "signed_at": datetime.now(UTC).isoformat(),
    }
    granted = await http.post(
        f"{network.url('intake')}/patients/{patient_id}/consents",
        json=consent,
        headers=auth("patient", [], patient_id),
    )
    assert granted.status_code == 201, granted.text
    return str(granted.json()["consent_id"])


async def mails_to(sink: SmtpSink, address: str, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
    async def probe():
        found = sink.to(address)
        return found if len(found) >= count else None

    return await eventually(probe, timeout=timeout, what=f"{count} mail(s) to {address}")


async def test_urgent_check_in_reaches_the_care_team_mailbox(network, smtp_sink: SmtpSink) -> None:
    email = "mob@example.org"
    async with httpx.AsyncClient(timeout=10) as http:
        await set_up_site(http, network)
        await internal_targets_are_refused(http, network)
        program_id = await publish_program(http, network, weekday=(date.today() + timedelta(days=2)).isoweekday())
        patient_id, _ = await enrolled_patient(http, network, program_id, email)
        await grant_consent(http, network, patient_id)
        await mails_to(smtp_sink, email)  # the welcome, once the consent covers it

        check_in = {"mood": 2, "craving": 9, "used_since_last": True, "safety_concern": True,
                    "substances": ["alcohol"], "challenges": "Lost my job today"}  # fmt: skip
        me = {**auth("patient", [], patient_id), "Idempotency-Key": "e2e-care-team-1"}
        sent_at = time.monotonic()
        submitted = await http.post(
            f"{network.url('intake')}/patients/{patient_id}/check-ins", json=check_in, headers=me
        )
        accepted_at = time.monotonic()
        assert submitted.status_code == 201, submitted.text
        assert submitted.json()["risk"] == "urgent"

        [mail] = await mails_to(smtp_sink, ON_CALL)
        latency_ms = (mail["received_at"] - accepted_at) * 1000
        print(
            f"\ncheck-in accepted -> care-team email received: {latency_ms:.0f} ms "
            f"(from request sent: {(mail['received_at'] - sent_at) * 1000:.0f} ms)"
        )
        assert latency_ms < 10_000
        assert "URGENT" in mail["subject"] and patient_id in mail["text"]
        for secret in (*NAMES, email, "Lost my job", "alcohol"):
            assert secret not in mail["text"] and secret not in mail["subject"]

        # Nobody acknowledges: a few seconds later the backup is alerted.
        [escalated] = await mails_to(smtp_sink, BACKUP)
        assert "escalated" in escalated["text"]
        clinician = auth("clinician", [SITE])
        [alert] = (await http.get(f"{network.url('notifications')}/alerts", headers=clinician)).json()
        assert alert["level"] == 1 and alert["reason"] == "urgent_check_in"
        acked = await http.post(
            f"{network.url('notifications')}/alerts/{alert['alert_id']}/acknowledge", headers=clinician
        )
        assert acked.status_code == 200, acked.text


def restart_notifications(network: Any, log_path: Any) -> None:
    """kill -9 the notifications process and start it again, as LocalNetwork would."""
    old = network.processes["notifications"]
    old.send_signal(signal.SIGKILL)
    old.wait(timeout=10)
    with open(log_path, "ab") as log:
        network.processes["notifications"] = subprocess.Popen(
            [sys.executable, "-m", "iopnet.cli", "serve", "notifications"],
            env=network.child_env("notifications"),
            stdout=log,
            stderr=log,
        )
    network.wait_ready(60)


async def reminders(http: httpx.AsyncClient, network: Any, patient_id: str) -> list[dict[str, Any]]:
    response = await http.get(
        f"{network.url('notifications')}/patients/{patient_id}/notifications", headers=auth("front_desk", [SITE])
    )
    if response.status_code != 200:
        return []
    return [n for n in response.json() if n["template"].startswith("reminder_")]


async def test_reminders_survive_a_restart_and_stop_on_revocation_and_discharge(
    network, smtp_sink: SmtpSink, tmp_path
) -> None:
    zone = ZoneInfo(TZ)
    session_day = datetime.now(zone).date() + timedelta(days=2)
    async with httpx.AsyncClient(timeout=10) as http:
        await set_up_site(http, network, quiet=("21:00", "08:00"))
        program_id = await publish_program(http, network, weekday=session_day.isoweekday())
        kept_id, kept_enrollment = await enrolled_patient(http, network, program_id, "kept@example.org")
        await grant_consent(http, network, kept_id)
        revoking_id, _ = await enrolled_patient(
            http, network, program_id, "revoking@example.org", ("Teodoro", "Villanueva")
        )
        revoked_consent = await grant_consent(http, network, revoking_id)

        async def planned(patient_id: str):
            found = await reminders(http, network, patient_id)
            return found if len(found) >= 8 and all(r["status"] == "pending" for r in found) else None

        # Four weekly sessions in the 28-day horizon, two reminders each.
        before = await eventually(lambda: planned(kept_id), timeout=30, what="reminders planned from the bookings")
        await eventually(lambda: planned(revoking_id), timeout=30, what="the second patient's reminders")
        for reminder in before:
            due, starts = (datetime.fromisoformat(reminder[k]) for k in ("due_at", "expires_at"))
            if reminder["template"] == "reminder_2h":
                assert due.astimezone(zone).strftime("%H:%M") == "08:00", reminder  # 07:00 is quiet
            else:
                assert due == starts - timedelta(hours=24), reminder
        assert min(
            datetime.fromisoformat(r["due_at"]).astimezone(zone).date() for r in before
        ) == session_day - timedelta(days=1)

        restart_notifications(network, tmp_path / "notifications.log")
        after = await reminders(http, network, kept_id)
        assert {(r["notification_id"], r["due_at"], r["status"]) for r in after} == {
            (r["notification_id"], r["due_at"], r["status"]) for r in before
        }

        # Consent revoked at intake: that patient's reminders stop at once.
        revoke = await http.post(
            f"{network.url('intake')}/consents/{revoked_consent}/revoke",
            json={},
            headers=auth("patient", [], revoking_id),
        )
        assert revoke.status_code == 200, revoke.text

        async def revoked():
            found = await reminders(http, network, revoking_id)
            return found if found and all(r["status_reason"] == "consent_revoked" for r in found) else None

        await eventually(revoked, timeout=20, what="reminders cancelled by the revocation")

        # Discharged at intake: the other patient's reminders are cancelled.
        discharge = await http.post(
            f"{network.url('intake')}/enrollments/{kept_enrollment}/discharge",
            json={"reason": "completed", "discharged_on": str(date.today())},
            headers=auth("clinician", [SITE]),
        )
        assert discharge.status_code == 200, discharge.text

        async def cancelled():
            found = await reminders(http, network, kept_id)
            return found if found and all(r["status"] == "cancelled" for r in found) else None

        done = await eventually(cancelled, timeout=20, what="reminders cancelled by the discharge")
        assert {r["status_reason"] for r in done} <= {"discharged", "booking_cancelled"}
        assert not [m for m in smtp_sink.mails if "reminder" in m["text"].lower()]
