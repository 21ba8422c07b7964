"""The screens that shape a site: programs and their weekly template, the week's calendar,
closures and the hours report (clinicians read, site admins change); the care team and
notification settings (site admins); sites and integrations (network admins)."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.console import signin
from services.console.backend import Backend
from services.console.clinic import chosen_site, optional, patient_names, visible_sites
from services.console.domain import ADMIN_ROLES, Person
from services.console.pages import Clinician, Services, current, render
from shared.errors import Forbidden, Invalid

router = APIRouter()
WEEKDAYS = ((1, "Mon"), (2, "Tue"), (3, "Wed"), (4, "Thu"), (5, "Fri"), (6, "Sat"), (7, "Sun"))
KINDS = ("check_in_group", "individual_therapy", "group_therapy", "workshop", "wrap_up")
TEMPLATE_ROWS = 6  # blank block rows the editor offers; empty ones are ignored


def site_admin(person: Annotated[Person, Depends(current)]) -> Person:
    if person.role not in ADMIN_ROLES:
        raise Forbidden("this screen is for site admins")
    return person


def network_admin(person: Annotated[Person, Depends(current)]) -> Person:
    if person.role != "network_admin":
        raise Forbidden("this screen is for network admins")
    return person


SiteAdmin = Annotated[Person, Depends(site_admin)]
NetworkAdmin = Annotated[Person, Depends(network_admin)]


# --- programs, calendar, closures, hours ---------------------------------------------------------


async def _at_risk(services: Backend, person: Person, enrollment_ids: list[str]) -> list[dict[str, str]]:
    enrollments = await asyncio.gather(
        *(optional(services.call("scheduling", "GET", f"/enrollments/{e}", person.token)) for e in enrollment_ids)
    )
    known = [e for e in enrollments if e]
    names = await patient_names(services, person, {e["patient_id"] for e in known})
    return [{"patient_id": e["patient_id"], "name": names[e["patient_id"]], "program_id": e["program_id"]}
            for e in known]  # fmt: skip


@router.get("/programs")
async def programs_page(request: Request, person: Clinician, services: Services, site: str | None = None) -> Response:
    sites = await visible_sites(services, person)
    current_site = chosen_site(sites, site)
    programs: list[Any] = []
    week: list[Any] = []
    report: dict[str, Any] | None = None
    at_risk: list[dict[str, str]] = []
    if current_site is not None:
        site_id = current_site["site_id"]
        today = datetime.now(UTC).astimezone(ZoneInfo(current_site["timezone"])).date()
        monday = today - timedelta(days=today.weekday())
        programs, week, report = await asyncio.gather(
            services.call("scheduling", "GET", "/programs", person.token, params={"site_id": site_id}),
            services.call("scheduling", "GET", f"/sites/{site_id}/sessions", person.token,
                          params={"from": str(monday), "to": str(monday + timedelta(days=6))}),
            optional(services.call("scheduling", "GET", f"/sites/{site_id}/hours-report", person.token)),
        )  # fmt: skip
        if report:
            at_risk = await _at_risk(services, person, report["site"]["at_risk"])
    return render(request, "programs.html", person, sites=sites, site=current_site, programs=programs, week=week,
                  report=report, at_risk=at_risk, weekdays=WEEKDAYS, kinds=KINDS, rows=range(TEMPLATE_ROWS),
                  admin=person.role in ADMIN_ROLES,
                  program_names={p["program_id"]: p["name"] for p in programs})  # fmt: skip


def _blocks(form: Any) -> list[dict[str, Any]]:
    """The template editor's filled rows as scheduling's blocks (the service validates them)."""
    blocks = []
    for row in range(TEMPLATE_ROWS):
        title = str(form.get(f"title_{row}", "")).strip()
        if not title:
            continue
        try:
            block: dict[str, Any] = {
                "weekday": int(form.get(f"weekday_{row}", 0)), "start": str(form.get(f"start_{row}", "")),
                "minutes": int(form.get(f"minutes_{row}", 0)), "kind": str(form.get(f"kind_{row}", "")), "title": title,
            }  # fmt: skip
        except ValueError:
            raise Invalid("day and minutes must be numbers") from None
        if form.get(f"capacity_{row}"):
            block["capacity"] = int(form[f"capacity_{row}"])
        blocks.append(block)
    return blocks


@router.post("/programs")
async def publish_program(request: Request, person: SiteAdmin, services: Services) -> Response:
    form = await request.form()
    signin.check_csrf(request, str(form.get("csrf", "")))
    body: dict[str, Any] = {
        "site_id": str(form.get("site_id", "")), "name": str(form.get("name", "")).strip(),
        "cohort": str(form.get("cohort", "adult")), "level_of_care": str(form.get("level_of_care", "2.1")),
        "blocks": _blocks(form),
    }  # fmt: skip
    if form.get("weekly_hours_target"):
        body["weekly_hours_target"] = float(str(form["weekly_hours_target"]))
    await services.call("scheduling", "POST", "/programs", person.token, json=body)
    return RedirectResponse(f"/programs?site={body['site_id']}", status_code=303)


@router.post("/sites/{site_id}/closures")
async def close_day(
    request: Request, site_id: str, person: SiteAdmin, services: Services, csrf: Annotated[str, Form()],
    day: Annotated[str, Form(max_length=10)], reason: Annotated[str, Form(max_length=10)],
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    await services.call("scheduling", "POST", f"/sites/{site_id}/closures", person.token,
                        json={"date": day, "reason": reason})  # fmt: skip
    return RedirectResponse(f"/programs?site={site_id}", status_code=303)


# --- care team and notification settings (site admins) -------------------------------------------


@router.get("/settings")
async def settings_page(
    request: Request, person: SiteAdmin, services: Services, site: str | None = None, saved: bool = False
) -> Response:
    sites = await visible_sites(services, person)
    current_site = chosen_site(sites, site)
    team = settings = None
    if current_site is not None:
        site_id = current_site["site_id"]
        team, settings = await asyncio.gather(
            optional(services.call("notifications", "GET", f"/sites/{site_id}/care-team", person.token)),
            optional(services.call("notifications", "GET", f"/sites/{site_id}/notification-settings", person.token)),
        )
    return render(request, "settings.html", person, sites=sites, site=current_site, team=team, settings=settings,
                  saved=saved)  # fmt: skip


async def _members(services: Backend, person: Person, site_id: str) -> list[dict[str, Any]]:
    team = await optional(services.call("notifications", "GET", f"/sites/{site_id}/care-team", person.token))
    members = (team or {"members": []})["members"]
    if any(m["channel"] == "webhook" for m in members):
        # The service never shows a webhook's signing secret, so a re-sent team would lose it.
        raise Invalid("this care team has a webhook member: change it through the API")
    keep = ("name", "role", "channel", "address", "language")
    return [{k: m[k] for k in keep if m.get(k)} for m in members]


async def _put_team(services: Backend, person: Person, site_id: str, members: list[dict[str, Any]]) -> None:
    await services.call("notifications", "PUT", f"/sites/{site_id}/care-team", person.token,
                        json={"members": members})  # fmt: skip


@router.post("/settings/{site_id}/care-team")
async def add_member(
    request: Request, site_id: str, person: SiteAdmin, services: Services, csrf: Annotated[str, Form()],
    name: Annotated[str, Form(max_length=200)], role: Annotated[str, Form(max_length=60)],
    channel: Annotated[str, Form(max_length=10)], address: Annotated[str, Form(max_length=500)],
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    member = {"name": name.strip(), "role": role.strip(), "channel": channel, "address": address.strip()}
    await _put_team(services, person, site_id, [*await _members(services, person, site_id), member])
    return RedirectResponse(f"/settings?site={site_id}&saved=true", status_code=303)


@router.post("/settings/{site_id}/care-team/{position}/remove")
async def remove_member(
    request: Request, site_id: str, position: int, person: SiteAdmin, services: Services,
    csrf: Annotated[str, Form()],
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    members = await _members(services, person, site_id)
    await _put_team(services, person, site_id, [m for i, m in enumerate(members) if i != position])
    return RedirectResponse(f"/settings?site={site_id}&saved=true", status_code=303)


@router.post("/settings/{site_id}/notifications")
async def save_notification_settings(
    request: Request, site_id: str, person: SiteAdmin, services: Services, csrf: Annotated[str, Form()],
    reminder_offsets: Annotated[str, Form(max_length=100)] = "",
    quiet_start: Annotated[str, Form(max_length=5)] = "", quiet_end: Annotated[str, Form(max_length=5)] = "",
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    try:
        offsets = [int(part) for part in reminder_offsets.replace(" ", "").split(",") if part]
    except ValueError:
        raise Invalid("reminders are minutes, separated by commas") from None
    body: dict[str, Any] = {"reminder_offsets_minutes": offsets}
    if quiet_start or quiet_end:
        body |= {"quiet_start": quiet_start, "quiet_end": quiet_end}
    await services.call("notifications", "PUT", f"/sites/{site_id}/notification-settings", person.token, json=body)
    return RedirectResponse(f"/settings?site={site_id}&saved=true", status_code=303)


# --- sites and integrations (network admins) -----------------------------------------------------


@router.get("/network")
async def network_page(request: Request, person: NetworkAdmin, services: Services) -> HTMLResponse:
    sites, integrations = await asyncio.gather(
        services.call("intake", "GET", "/sites", person.token),
        services.call("intake", "GET", "/integrations", person.token),
    )
    return render(request, "network.html", person, sites=sites, integrations=integrations, password=None)


@router.post("/network/sites")
async def add_site(
    request: Request, person: NetworkAdmin, services: Services, csrf: Annotated[str, Form()],
    site_id: Annotated[str, Form(max_length=40)], name: Annotated[str, Form(max_length=200)],
    timezone: Annotated[str, Form(max_length=64)],
) -> Response:  # fmt: skip
    signin.check_csrf(request, csrf)
    site = {"site_id": site_id.strip(), "name": name.strip(), "timezone": timezone.strip()}
    await services.call("intake", "POST", "/sites", person.token, json=site)
    return RedirectResponse("/network", status_code=303)


@router.post("/network/integrations")
async def register_integration(
    request: Request, person: NetworkAdmin, services: Services, csrf: Annotated[str, Form()],
    integration_id: Annotated[str, Form(max_length=40)], sites: Annotated[str, Form(max_length=2000)],
    basis: Annotated[str, Form(max_length=10)], purpose: Annotated[str, Form(max_length=40)] = "",
) -> HTMLResponse:  # fmt: skip
    signin.check_csrf(request, csrf)
    body: dict[str, Any] = {"integration_id": integration_id.strip(), "basis": basis,
                            "sites": [s.strip() for s in sites.split(",") if s.strip()]}  # fmt: skip
    if basis == "consent":
        body["purpose"] = purpose or "care_coordination"
    created = await services.call("intake", "POST", "/integrations", person.token, json=body)
    # The password is shown once, on this answer only (never stored by the console).
    all_sites, integrations = await asyncio.gather(
        services.call("intake", "GET", "/sites", person.token),
        services.call("intake", "GET", "/integrations", person.token),
    )
    return render(request, "network.html", person, sites=all_sites, integrations=integrations,
                  password=(created["integration_id"], created["password"]))  # fmt: skip


@router.post("/network/integrations/{integration_id}/revoke")
async def revoke_integration(
    request: Request, integration_id: str, person: NetworkAdmin, services: Services, csrf: Annotated[str, Form()]
) -> Response:
    signin.check_csrf(request, csrf)
    await services.call("intake", "POST", f"/integrations/{integration_id}/revoke", person.token)
    return RedirectResponse("/network", status_code=303)
