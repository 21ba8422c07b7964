"""The front desk's and the clinicians' screens: today at my site (rosters, one tap per
patient for attendance), patients (search, the intake form with its duplicate warning,
enrollment) and the patient page. Each handler asks the services with the person's
token and renders what comes back; the services scope and audit every read."""

import asyncio
import re
from collections.abc import Awaitable
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.console import signin
from services.console.backend import Backend, BackendError
from services.console.domain import ADMIN_ROLES, ATTENDANCE, Person, attended_minutes, trend
from services.console.pages import Clinician, Services, StaffMember, render
from shared import clock
from shared.errors import Invalid

router = APIRouter()
T = TypeVar("T")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def optional(call: Awaitable[T]) -> T | None:
    """A part of a page the person may not see (403) or that does not exist yet (404)."""
    try:
        return await call
    except BackendError as exc:
        if exc.status in (403, 404):
            return None
        raise


async def visible_sites(services: Backend, person: Person) -> list[dict[str, Any]]:
    """The sites the person works at, as scheduling knows them (with their time zone)."""
    sites: list[dict[str, Any]] = await services.call("scheduling", "GET", "/sites", person.token)
    return [s for s in sites if person.role == "network_admin" or s["site_id"] in person.sites]


def chosen_site(sites: list[dict[str, Any]], asked: str | None) -> dict[str, Any] | None:
    return next((s for s in sites if s["site_id"] == asked), sites[0] if sites else None)


async def patient_names(services: Backend, person: Person, patient_ids: set[str]) -> dict[str, str]:
    """Names for a roster: each read is the person's own, audited by intake."""

    async def name(patient_id: str) -> tuple[str, str]:
        record = await optional(services.call("intake", "GET", f"/patients/{patient_id}", person.token))
        return patient_id, f"{record['given_name']} {record['family_name']}" if record else patient_id[:8]

    return dict(await asyncio.gather(*(name(p) for p in sorted(patient_ids))))


# --- today at my site --------------------------------------------------------------------------


async def _session_with_roster(services: Backend, person: Person, session_id: str) -> dict[str, Any]:
    detail: dict[str, Any] = await services.call("scheduling", "GET", f"/sessions/{session_id}", person.token)
    starts, ends = datetime.fromisoformat(detail["starts_at"]), datetime.fromisoformat(detail["ends_at"])
    detail["minutes"] = int((ends - starts).total_seconds() // 60)
    # Attendance opens when the session starts (scheduling refuses it before).
    detail["started"] = starts <= clock.now()
    detail["booked"] = [r for r in detail["roster"] if r["status"] == "booked"]
    detail["waitlisted"] = sorted((r for r in detail["roster"] if r["status"] == "waitlisted"),
                                  key=lambda r: r["position"] or 0)  # fmt: skip
    return detail


async def _named(services: Backend, person: Person, sessions: list[dict[str, Any]]) -> dict[str, str]:
    return await patient_names(services, person, {r["patient_id"] for s in sessions for r in s["roster"]})


@router.get("/today")
async def today_page(request: Request, person: StaffMember, services: Services, site: str | None = None) -> Response:
    sites = await visible_sites(services, person)
    current = chosen_site(sites, site)
    sessions: list[dict[str, Any]] = []
    day = date.today()
    if current is not None:
        day = datetime.now(UTC).astimezone(ZoneInfo(current["timezone"])).date()
        listed = await services.call("scheduling", "GET", f"/sites/{current['site_id']}/sessions", person.token,
                                     params={"from": str(day), "to": str(day)})  # fmt: skip
        rosters = (_session_with_roster(services, person, s["session_id"]) for s in listed)
        sessions = list(await asyncio.gather(*rosters))
    names = await _named(services, person, sessions)
    return render(request, "today.html", person, sites=sites, site=current, day=day, sessions=sessions, names=names,
                  statuses=ATTENDANCE, tz=current["timezone"] if current else None)  # fmt: skip


@router.post("/today/sessions/{session_id}/attendance")
async def record_attendance(
    request: Request,
    session_id: str,
    person: Clinician,
    services: Services,
    csrf: Annotated[str, Form()],
    patient_id: Annotated[str, Form(max_length=36)],
    status: Annotated[str, Form(max_length=10)],
) -> Response:
    signin.check_csrf(request, csrf)
    if status not in ATTENDANCE:
        raise Invalid("unknown attendance status")
    detail = await _session_with_roster(services, person, session_id)
    record = {"patient_id": patient_id, "status": status, "minutes": attended_minutes(status, detail["minutes"])}
    await services.call("scheduling", "POST", f"/sessions/{session_id}/attendance", person.token,
                        json={"records": [record]})  # fmt: skip
    if not request.headers.get("hx-request"):
        return RedirectResponse(f"/today?site={detail['site_id']}", status_code=303)
    detail = await _session_with_roster(services, person, session_id)
    zones = {site["site_id"]: site["timezone"] for site in await visible_sites(services, person)}
    return render(request, "session_card.html", person, s=detail, names=await _named(services, person, [detail]),
                  statuses=ATTENDANCE, tz=zones.get(detail["site_id"]))  # fmt: skip


# --- registering and enrolling -------------------------------------------------------------------


@router.get("/patients/new")
async def new_patient_page(request: Request, person: StaffMember, services: Services) -> HTMLResponse:
    sites = await visible_sites(services, person)
    return render(request, "patient_new.html", person, sites=sites, form={}, duplicate=None, existing=None)


@router.post("/patients/new")
async def register_patient(
    request: Request,
    person: StaffMember,
    services: Services,
    csrf: Annotated[str, Form()],
    site_id: Annotated[str, Form(max_length=40)],
    given_name: Annotated[str, Form(max_length=100)],
    family_name: Annotated[str, Form(max_length=100)],
    birth_date: Annotated[str, Form(max_length=10)],
    phone: Annotated[str, Form(max_length=20)] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    preferred_channel: Annotated[str, Form(max_length=5)] = "none",
    language: Annotated[str, Form(max_length=5)] = "en",
    confirmed_not_duplicate: Annotated[bool, Form()] = False,
) -> Response:
    signin.check_csrf(request, csrf)
    form = {"site_id": site_id, "given_name": given_name, "family_name": family_name, "birth_date": birth_date,
            "phone": phone.strip() or None, "email": email.strip() or None, "preferred_channel": preferred_channel,
            "language": language}  # fmt: skip
    try:
        created = await services.call("intake", "POST", "/patients", person.token,
                                      json={**form, "confirmed_not_duplicate": confirmed_not_duplicate})  # fmt: skip
    except BackendError as exc:
        if exc.status not in (409, 422):
            raise
        # The duplicate warning (409) names the record at a site the desk serves; the
        # desk may open it, or confirm that this is another person and register again.
        answer = render(request, "patient_new.html", person, sites=await visible_sites(services, person), form=form,
                        duplicate=exc.message if exc.status == 409 else None, existing=_UUID.search(exc.message),
                        problem=exc.message if exc.status == 422 else None)  # fmt: skip
        answer.status_code = exc.status
        return answer
    return RedirectResponse(f"/patients/{created['patient_id']}", status_code=303)


@router.post("/patients/{patient_id}/enroll")
async def enroll(
    request: Request,
    patient_id: str,
    person: StaffMember,
    services: Services,
    csrf: Annotated[str, Form()],
    program_id: Annotated[str, Form(max_length=64)],
    level_of_care: Annotated[str, Form(max_length=3)],
    cohort: Annotated[str, Form(max_length=12)],
    start_date: Annotated[str, Form(max_length=10)],
    referral_source: Annotated[str, Form(max_length=12)],
) -> Response:
    signin.check_csrf(request, csrf)
    body = {"program_id": program_id, "level_of_care": level_of_care, "cohort": cohort, "start_date": start_date,
            "referral_source": referral_source}  # fmt: skip
    await services.call("intake", "POST", f"/patients/{patient_id}/enrollments", person.token, json=body)
    return RedirectResponse(f"/patients/{patient_id}#enrollments", status_code=303)


# --- consents ------------------------------------------------------------------------------------


@router.post("/patients/{patient_id}/consents")
async def grant_consent(
    request: Request,
    patient_id: str,
    person: StaffMember,
    services: Services,
    csrf: Annotated[str, Form()],
    recipient: Annotated[str, Form(max_length=120)],
    purpose: Annotated[str, Form(max_length=40)],
    information: Annotated[str, Form(max_length=2000)],
    expires_on: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    signin.check_csrf(request, csrf)
    body: dict[str, Any] = {"recipient": recipient.strip(), "purpose": purpose, "information": information.strip(),
                            "signed_at": datetime.now(UTC).isoformat()}  # fmt: skip
    body["expires_on" if expires_on else "expires_event"] = expires_on or "end_of_treatment"
    await services.call("intake", "POST", f"/patients/{patient_id}/consents", person.token, json=body)
    return RedirectResponse(f"/patients/{patient_id}#consents", status_code=303)


@router.post("/patients/{patient_id}/consents/{consent_id}/revoke")
async def revoke_consent(
    request: Request, patient_id: str, consent_id: str, person: StaffMember, services: Services,
    csrf: Annotated[str, Form()],
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    await services.call("intake", "POST", f"/consents/{consent_id}/revoke", person.token, json={})
    return RedirectResponse(f"/patients/{patient_id}#consents", status_code=303)


# --- the patient page ----------------------------------------------------------------------------


async def _episode(services: Backend, person: Person, enrollment_id: str) -> dict[str, Any]:
    detail, plan = await asyncio.gather(
        services.call("intake", "GET", f"/enrollments/{enrollment_id}", person.token),
        optional(services.call("intake", "GET", f"/enrollments/{enrollment_id}/plan", person.token)),
    )
    detail["goals"] = plan["goals"] if plan else []
    return dict(detail)


@router.get("/patients/{patient_id}")
async def patient_page(request: Request, patient_id: str, person: StaffMember, services: Services) -> HTMLResponse:
    record = await services.call("intake", "GET", f"/patients/{patient_id}", person.token)
    admin = person.role in ADMIN_ROLES
    token = person.token
    episodes, check_ins, bookings, consents, messages, programs, sites, audit, disclosures = await asyncio.gather(
        asyncio.gather(*(_episode(services, person, e["enrollment_id"]) for e in record["enrollments"])),
        optional(services.call("intake", "GET", f"/patients/{patient_id}/check-ins", token)),
        optional(services.call("scheduling", "GET", f"/patients/{patient_id}/bookings", token)),
        optional(services.call("intake", "GET", f"/patients/{patient_id}/consents", token)),
        optional(services.call("notifications", "GET", f"/patients/{patient_id}/notifications", token)),
        optional(services.call("intake", "GET", "/programs", token, params={"site_id": record["site_id"]})),
        visible_sites(services, person),
        optional(services.call("intake", "GET", "/audit", token, params={"patient_id": patient_id}))
        if admin else _nothing(),
        optional(services.call("intake", "GET", f"/patients/{patient_id}/disclosures", token))
        if admin else _nothing(),
    )  # fmt: skip
    recent = sorted(check_ins or [], key=lambda c: c["submitted_at"])[-30:]
    return render(
        request, "patient.html", person, patient=record, episodes=episodes, check_ins=list(reversed(recent)),
        chart=trend([(c["mood"], c["craving"]) for c in recent]), bookings=bookings, consents=consents,
        messages=messages, programs=programs or [], audit=audit, disclosures=disclosures, today=date.today(),
        program_names={p["program_id"]: p["name"] for p in programs or []},
        tz=next((s["timezone"] for s in sites or [] if s["site_id"] == record["site_id"]), None),
    )  # fmt: skip


async def _nothing() -> None:
    return None
