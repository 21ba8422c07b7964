"""`iopnet seed-demo` / `iopnet run --demo`: a small demo network through the public APIs.

Everything goes through HTTP as a front desk would, so the demo also exercises the
events: sites, patients (made-up people) and their enrollments.
"""

from datetime import date, timedelta

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
        created = 0
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
                "program_id": f"{cohort}-iop",
                "level_of_care": "2.1",
                "cohort": cohort,
                "start_date": start.isoformat(),
                "referral_source": "self",
            }
            patient_id = response.json()["patient_id"]
            http.post(f"{intake}/patients/{patient_id}/enrollments", json=enrollment, headers=desk).raise_for_status()
            created += 1
    typer.echo(f"demo: {len(DEMO_SITES)} sites, {created} patients enrolled")
