"""`iopnet seed-demo` / `iopnet run --demo`: a small demo network through the public APIs.

Everything goes through HTTP as staff would, so the demo also exercises the events:
sites, programs (published at scheduling, learned by intake from ProgramPublished),
patients (made-up people) and their enrollments.
"""

import time
from datetime import date, timedelta
from typing import Any

import httpx
import typer

from shared.auth import mint_token
from shared.settings import Settings

DEMO_SITES = [
    {"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"},
    {"site_id": "denver-central", "name": "Denver Central", "timezone": "America/Denver"},
]
DEMO_PATIENTS = [
    ("columbus-east", "Avery", "Demo", "1985-03-14", "email", "adult"),
    ("columbus-east", "Jordan", "Sample", "1992-11-02", "sms", "adult"),
    ("columbus-east", "Riley", "Example", "2009-07-21", "email", "adolescent"),
    ("denver-central", "Casey", "Placeholder", "1978-01-30", "email", "adult"),
    ("denver-central", "Morgan", "Fictional", "1999-05-09", "none", "adult"),
]


DEMO_BLOCKS = [
    {"start": "09:00", "minutes": 30, "kind": "check_in_group", "title": "Morning check-in"},
    {"start": "09:30", "minutes": 90, "kind": "group_therapy", "title": "Group therapy"},
    {"start": "11:00", "minutes": 60, "kind": "workshop", "title": "Workshop",
     "topics": ["Stress management", "Relapse prevention", "Healthy habits"]},
    {"start": "12:00", "minutes": 30, "kind": "wrap_up", "title": "Wrap-up"},
]  # fmt: skip


def when_known(post: Any, timeout: float = 20.0) -> httpx.Response:
    """Retry a request that names something another service has just published (it is
    learned from an event, a moment later), until it is accepted or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        response = post()
        if (response.status_code != 422 and response.status_code != 404) or time.monotonic() > deadline:
            return response  # type: ignore[no-any-return]
        time.sleep(0.1)


def seed_demo(settings: Settings) -> None:
    secret = settings.signing_secret
    admin = {"Authorization": f"Bearer {mint_token(secret, sub='demo-admin', role='network_admin')}"}
    intake = settings.base_url("intake")
    start = date.today() + timedelta(days=1)
    with httpx.Client(timeout=10) as http:
        for site in DEMO_SITES:
            response = http.post(f"{intake}/sites", json=site, headers=admin)
            if response.status_code not in (201, 409):
                raise RuntimeError(f"could not register {site['site_id']}: {response.status_code}")
        programs = {
            (site["site_id"], cohort): when_known(lambda s=site, c=cohort: _program(http, settings, admin, s, c))
            for site in DEMO_SITES
            for cohort in ("adult", "adolescent")
        }
        created, first_patient = 0, ""
        for index, (site_id, given, family, born, channel, cohort) in enumerate(DEMO_PATIENTS):
            token = mint_token(secret, sub="demo-front-desk", role="front_desk", sites=[site_id])
            desk = {"Authorization": f"Bearer {token}"}
            patient = {
                "site_id": site_id,
                "given_name": given,
                "family_name": family,
                "birth_date": born,
                "phone": f"+1555010{index:04d}",
                "email": f"{given.lower()}.{family.lower()}@example.org",
                "preferred_channel": channel,
                "language": "es" if index % 2 else "en",
            }
            response = http.post(f"{intake}/patients", json=patient, headers=desk)
            response.raise_for_status()
            enrollment = {
                "program_id": programs[(site_id, cohort)].json()["program_id"],
                "level_of_care": "2.1",
                "cohort": cohort,
                "start_date": start.isoformat(),
                "referral_source": "self",
            }
            patient_id = response.json()["patient_id"]
            url = f"{intake}/patients/{patient_id}/enrollments"
            when_known(lambda u=url, e=enrollment, d=desk: http.post(u, json=e, headers=d)).raise_for_status()
            created += 1
            first_patient = first_patient or patient_id
    typer.echo(f"demo: {len(DEMO_SITES)} sites, {created} patients enrolled")
    # The console's development sign-in asks a patient for their id (made-up people only).
    typer.echo(f"demo: sign in to the console as a patient with patient id {first_patient}")


def _program(
    http: httpx.Client, settings: Settings, headers: dict[str, str], site: dict[str, str], cohort: str
) -> httpx.Response:
    body = {
        "site_id": site["site_id"],
        "name": f"{cohort.title()} IOP",
        "cohort": cohort,
        "blocks": [{**block, "weekday": day} for day in (1, 3, 5) for block in DEMO_BLOCKS],
    }
    return http.post(f"{settings.base_url('scheduling')}/programs", json=body, headers=headers)
