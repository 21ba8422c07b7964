"""The console's screens: thin handlers that ask the services with the person's token and
render what comes back. No patient data is kept here, in the session or in the browser."""

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sse_starlette.sse import EventSourceResponse

from services.console import signin
from services.console.backend import Backend, BackendError
from services.console.domain import CRISIS_LINES, Language, Person, home_for, language_from, text
from shared.errors import Forbidden

router = APIRouter()


class SignInRequired(Exception):
    """No good session: the browser goes to the sign-in page."""


def _language(request: Request) -> Language:
    return language_from(request.headers.get("accept-language"), request.session.get("lang"))


def render(request: Request, template: str, person: Person | None = None, **values: Any) -> HTMLResponse:
    lang = _language(request)
    context = {
        "lang": lang, "person": person, "csrf": signin.csrf_token(request),
        "t": lambda key: text(key, lang), **values,
    }  # fmt: skip
    return request.app.state.templates.TemplateResponse(request, template, context)  # type: ignore[no-any-return]


def current(request: Request) -> Person:
    person = signin.signed_in(request, timedelta(minutes=request.app.state.settings.console_idle_minutes))
    if person is None:
        raise SignInRequired
    return person


def backend(request: Request) -> Backend:
    return request.app.state.backend  # type: ignore[no-any-return]


def clinical(person: Annotated[Person, Depends(current)]) -> Person:
    if not person.is_clinical:
        raise Forbidden("this screen is for clinicians")
    return person


def staff(person: Annotated[Person, Depends(current)]) -> Person:
    if not person.is_staff:
        raise Forbidden("this screen is for staff")
    return person


def patient(person: Annotated[Person, Depends(current)]) -> Person:
    if person.role != "patient" or not person.patient_id:
        raise Forbidden("this screen is for patients")
    return person


Clinician = Annotated[Person, Depends(clinical)]
StaffMember = Annotated[Person, Depends(staff)]
PatientPerson = Annotated[Person, Depends(patient)]
Services = Annotated[Backend, Depends(backend)]


# --- signing in and out -----------------------------------------------------------------------


@router.get("/")
async def home(request: Request) -> Response:
    person = signin.signed_in(request, timedelta(minutes=request.app.state.settings.console_idle_minutes))
    return RedirectResponse(home_for(person) if person else "/signin", status_code=303)


@router.get("/signin")
async def signin_page(request: Request) -> HTMLResponse:
    settings = request.app.state.settings
    ended = request.session.pop("ended", None)
    return render(
        request, "signin.html", provider=request.app.state.oauth is not None, dev=settings.console_dev_signin,
        demo_staff=signin.DEMO_STAFF, ended=ended,
    )  # fmt: skip


@router.get("/signin/provider")
async def signin_with_provider(request: Request) -> Response:
    oauth = request.app.state.oauth
    if oauth is None:
        raise Forbidden("no identity provider is configured")
    redirect_uri = signin.public_url(request.app.state.settings) + "/auth/callback"
    return await oauth.provider.authorize_redirect(request, redirect_uri)  # type: ignore[no-any-return]


@router.get("/auth/callback")
async def provider_callback(request: Request) -> Response:
    oauth = request.app.state.oauth
    if oauth is None:
        raise Forbidden("no identity provider is configured")
    token = await oauth.provider.authorize_access_token(request)
    person = signin.person_from_provider(token, request.app.state.settings)
    signin.remember(request, person)
    return RedirectResponse(home_for(person), status_code=303)


@router.post("/signin/dev")
async def signin_for_development(
    request: Request,
    csrf: Annotated[str, Form()],
    sub: Annotated[str, Form(max_length=100)],
    patient_id: Annotated[str | None, Form(max_length=36)] = None,
) -> Response:
    signin.check_csrf(request, csrf)
    person = signin.development_person(request.app.state.settings, sub, patient_id or None)
    signin.remember(request, person)
    return RedirectResponse(home_for(person), status_code=303)


@router.post("/signout")
async def signout(request: Request, csrf: Annotated[str, Form()]) -> Response:
    signin.check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/signin", status_code=303)


@router.get("/language/{code}")
async def choose_language(request: Request, code: str, next: str = "/") -> Response:
    """Back to the page the person was on (the browser sends no Referer: our policy)."""
    request.session["lang"] = language_from(None, code)
    local = next.startswith("/") and not next.startswith("//") and "\\" not in next
    return RedirectResponse(next if local else "/", status_code=303)


# --- alerts (clinicians) --------------------------------------------------------------------


async def _open_alerts(services: Backend, person: Person) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = await services.call(
        "notifications", "GET", "/alerts", person.token, params={"status": "open"}
    )
    names: dict[str, str] = {}
    for alert in alerts:
        patient_id = alert["patient_id"]
        if patient_id not in names:
            try:
                record = await services.call("intake", "GET", f"/patients/{patient_id}", person.token)
                names[patient_id] = f"{record['given_name']} {record['family_name']}"
            except BackendError:
                names[patient_id] = patient_id[:8]
        alert["patient_name"] = names[patient_id]
    return alerts


async def _zones(services: Backend, person: Person) -> dict[str, str]:
    """Each visible site's time zone: times are shown on the clinic's wall clock."""
    sites: list[dict[str, Any]] = await services.call("scheduling", "GET", "/sites", person.token)
    return {site["site_id"]: site["timezone"] for site in sites}


async def _alert_list(request: Request, template: str, person: Person, services: Backend) -> HTMLResponse:
    alerts, zones = await asyncio.gather(_open_alerts(services, person), _zones(services, person))
    return render(request, template, person, alerts=alerts, zones=zones)


@router.get("/alerts")
async def alerts_page(request: Request, person: Clinician, services: Services) -> HTMLResponse:
    return await _alert_list(request, "alerts.html", person, services)


@router.get("/alerts/list")
async def alert_list(request: Request, person: Clinician, services: Services) -> HTMLResponse:
    return await _alert_list(request, "alert_list.html", person, services)


@router.post("/alerts/{alert_id}/acknowledge")
async def acknowledge(
    request: Request, alert_id: str, person: Clinician, services: Services, csrf: Annotated[str, Form()]
) -> Response:
    signin.check_csrf(request, csrf)
    await services.call("notifications", "POST", f"/alerts/{alert_id}/acknowledge", person.token)
    if request.headers.get("hx-request"):
        return await _alert_list(request, "alert_list.html", person, services)
    return RedirectResponse("/alerts", status_code=303)


@router.get("/alerts/stream")
async def alert_stream(request: Request, person: Clinician) -> EventSourceResponse:
    """An event per new alert at one of the person's sites; the page then reloads its list."""
    sites = None if person.role == "network_admin" else frozenset(person.sites)

    async def events() -> Any:
        async for _site in request.app.state.alerts.listen(sites):
            yield {"event": "alert", "data": "new"}

    return EventSourceResponse(events(), ping=15)


# --- patients (staff) -------------------------------------------------------------------------


@router.get("/patients")
async def patients_page(
    request: Request, person: StaffMember, services: Services, name: str | None = None, birth_date: date | None = None
) -> HTMLResponse:
    found: list[dict[str, Any]] = []
    searched = bool(name or birth_date)
    if searched:
        params = {k: v for k, v in {"name": name, "birth_date": birth_date and str(birth_date)}.items() if v}
        found = await services.call("intake", "GET", "/patients", person.token, params=params)
    return render(request, "patients.html", person, patients=found, searched=searched, name=name, birth_date=birth_date)


# --- the patient's own page (phone-sized) -------------------------------------------------


async def _bookings(services: Backend, person: Person) -> list[dict[str, Any]]:
    try:
        bookings: list[dict[str, Any]] = await services.call(
            "scheduling", "GET", f"/patients/{person.patient_id}/bookings", person.token
        )
    except BackendError:
        return []
    now = datetime.now(UTC).isoformat()
    return sorted((b for b in bookings if str(b.get("starts_at", "")) >= now[:19]), key=lambda b: b["starts_at"])[:10]


async def _my_consents(services: Backend, person: Person) -> list[dict[str, Any]]:
    try:
        consents: list[dict[str, Any]] = await services.call(
            "intake", "GET", f"/patients/{person.patient_id}/consents", person.token
        )
    except BackendError:
        return []
    return consents


async def _my_page(request: Request, person: Person, services: Backend, **values: Any) -> HTMLResponse:
    bookings, consents = await asyncio.gather(_bookings(services, person), _my_consents(services, person))
    return render(request, "me.html", person, crisis=CRISIS_LINES[_language(request)], bookings=bookings,
                  consents=consents, **{"show_crisis": False, "outcome": None, **values})  # fmt: skip


@router.get("/me")
async def my_page(request: Request, person: PatientPerson, services: Services) -> HTMLResponse:
    return await _my_page(request, person, services)


@router.post("/me/consents/{consent_id}/revoke")
async def revoke_my_consent(
    request: Request, consent_id: str, person: PatientPerson, services: Services, csrf: Annotated[str, Form()]
) -> HTMLResponse:
    """A patient may revoke a consent at any time (42 CFR 2.31); intake records when."""
    signin.check_csrf(request, csrf)
    await services.call("intake", "POST", f"/consents/{consent_id}/revoke", person.token, json={})
    return await _my_page(request, person, services, outcome="revoked")


@router.post("/me/check-ins")
async def submit_check_in(
    request: Request,
    person: PatientPerson,
    services: Services,
    csrf: Annotated[str, Form()],
    mood: Annotated[int, Form(ge=1, le=10)],
    craving: Annotated[int, Form(ge=0, le=10)],
    sleep_hours: Annotated[float | None, Form(ge=0, le=24)] = None,
    used_since_last: Annotated[bool, Form()] = False,
    safety_concern: Annotated[bool, Form()] = False,
    note: Annotated[str, Form(max_length=2000)] = "",
) -> HTMLResponse:
    signin.check_csrf(request, csrf)
    body: dict[str, Any] = {
        "mood": mood, "craving": craving, "used_since_last": used_since_last, "safety_concern": safety_concern,
    }  # fmt: skip
    if sleep_hours is not None:
        body["sleep_hours"] = sleep_hours
    if note.strip():
        body["challenges"] = note.strip()
    try:
        await services.call("intake", "POST", f"/patients/{person.patient_id}/check-ins", person.token, json=body)
        outcome = "sent"
    except BackendError:
        outcome = "failed"
    # The crisis resources show whatever happened to the request.
    return await _my_page(request, person, services, show_crisis=safety_concern, outcome=outcome)
