"""What intake does, each in the caller's transaction: register and change sites and
patients, open, activate, re-level, transfer and discharge episodes, grant and revoke
Part 2 consents, record check-ins with their risk, keep recovery plans, resolve the
potential-duplicate queue, and project the programs scheduling publishes.

Both entrypoints call these: api.py for commands (after it has checked access),
handlers.py for events, app.py for the activation job. Every event goes through the
outbox in the same transaction as the change that caused it. `now`/`today` are
parameters so the rules can be exercised at any instant.

A broken rule raises `DomainError` (in domain.py or here); shared.errors maps its kind
to the API's answer. The `check_*` functions need no record: routes call them before
they look anything up, so bad input is answered alike whatever records exist or the
caller may see."""

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal, cast
from uuid import UUID, uuid4, uuid5
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import domain, store
from services.intake.store import ConsentRow, DuplicateRow, EnrollmentRow, GoalRow, PatientRow, SiteRow
from shared import clock
from shared.auth import Principal
from shared.contracts import Envelope, Event
from shared.contracts.events import (
    CheckInSubmitted,
    ConsentGranted,
    ConsentRevoked,
    DischargeReason,
    DisclosureRecorded,
    GoalStatus,
    PatientContactChanged,
    PatientDischarged,
    PatientEnrolled,
    PatientTransferred,
    ProgramPublished,
    Risk,
    SiteRegistered,
    TreatmentPlanUpdated,
)
from shared.domain_errors import DomainError
from shared.messaging import Interest
from shared.messaging.outbox import Chain, envelope_for

OPEN = frozenset(str(s) for s in domain.OPEN_STATUSES)
GoalState = Literal["active", "met", "dropped"]  # a goal's status on the bus (GoalStatus.status)


def _episode(enrollment: EnrollmentRow) -> Chain:
    """Every event of an episode shares its correlation id (its PatientEnrolled's)."""
    return Chain(UUID(enrollment["correlation_id"]))


async def _reloaded(session: AsyncSession, enrollment_id: str) -> EnrollmentRow:
    enrollment = await store.get_enrollment(session, enrollment_id)
    assert enrollment is not None
    return enrollment


# --- sites ----------------------------------------------------------------------------


async def register_site(session: AsyncSession, spec: dict[str, Any]) -> None:
    domain.validate_timezone(spec["timezone"])
    if await store.get_site(session, spec["site_id"]):
        raise DomainError("conflict", f"site {spec['site_id']} already exists")
    await store.add_site(session, **spec)
    await store.outbox.emit(session, SiteRegistered(name=spec["name"], timezone=spec["timezone"]), spec["site_id"])


async def update_site(session: AsyncSession, site_id: str, changes: dict[str, Any]) -> SiteRow:
    """Returns the site as changed. Other services learn only of a new name or timezone."""
    if "timezone" in changes:
        domain.validate_timezone(changes["timezone"] or "")
    site = await store.get_site(session, site_id)
    if site is None:
        raise DomainError("not_found", "site not found")
    if changes:
        await store.update_site(session, site_id, **changes)
    updated = cast(SiteRow, {**site, **changes})
    if changes.keys() & {"name", "timezone"}:
        await store.outbox.emit(session, SiteRegistered(name=updated["name"], timezone=updated["timezone"]), site_id)
    return updated


# --- patients ---------------------------------------------------------------------------


async def register_patient(
    session: AsyncSession, principal: Principal, spec: dict[str, Any], confirmed_not_duplicate: bool, today: date
) -> dict[str, Any]:
    """Register a patient unless a likely duplicate is at a site the caller serves (and
    the desk has not confirmed it is another person). Returns the new patient's values."""
    domain.validate_birth_date(spec["birth_date"], today)
    patient_id = uuid4()
    name_key = domain.normalize_name(spec["given_name"] + spec["family_name"])
    if not await store.site_locking_identity(session, spec["site_id"], name_key, spec["birth_date"]):
        raise DomainError("invalid", "unknown site", fields={"site_id": "no such site is registered"})
    matches = await store.find_identities(session, name_key, spec["birth_date"])
    seen = [m for m in matches if principal.sees_site(m["site_id"])]
    if seen and not confirmed_not_duplicate:
        # Naming the existing record is an access to it: audited, and the row kept.
        existing = seen[0]
        await store.record_access(
            session, principal, "patient.duplicate_match", existing["site_id"], existing["patient_id"]
        )
        raise DomainError(
            "conflict",
            f"likely duplicate of patient {existing['patient_id']} ({existing['mrn']})",
            fields={"patient_id": existing["patient_id"]},
            keeps_audit=True,
        )
    mrn = domain.new_mrn()
    while not await store.add_patient(session, patient_id=str(patient_id), mrn=mrn, name_key=name_key, **spec):
        mrn = domain.new_mrn()
    await _queue_unseen_matches(session, patient_id, [m for m in matches if m not in seen])
    await _stage_contact(session, patient_id, spec["site_id"], spec)
    return {**spec, "patient_id": patient_id, "mrn": mrn}


async def _queue_unseen_matches(session: AsyncSession, patient_id: UUID, unseen: list[PatientRow]) -> None:
    """Matches at sites the caller does not serve go to the network admins' queue, never
    into the answer: a 409 would tell this site that the person is in treatment elsewhere.
    No audit row is written here: nothing was disclosed to anyone yet, and a row at the
    matched site naming this caller would tell that site where the person registered.
    A desk's `confirmed_not_duplicate` covers the records it was shown, not these."""
    for match in unseen:
        await store.add_potential_duplicate(session, str(patient_id), match["patient_id"])


async def _stage_contact(session: AsyncSession, patient_id: UUID, site_id: str, values: Mapping[str, Any]) -> None:
    """Contact details travel only on iop.restricted.> (PatientContactChanged.restricted)."""
    contact = PatientContactChanged(
        patient_id=patient_id,
        phone=values["phone"],
        email=values["email"],
        preferred_channel=values["preferred_channel"],
        language=values["language"],
    )
    await store.outbox.emit(session, contact, site_id)


def check_patient_changes(changes: dict[str, Any], today: date) -> None:
    if "birth_date" in changes:
        domain.validate_birth_date(changes["birth_date"], today)


async def update_patient(session: AsyncSession, patient: PatientRow, changes: dict[str, Any]) -> PatientRow:
    """Returns the patient as changed; a changed contact is published (restricted)."""
    updated = cast(PatientRow, {**patient, **changes})
    domain.check_channel_address(updated["preferred_channel"], updated["phone"], updated["email"])
    stored = dict(changes)
    if changes.keys() & {"given_name", "family_name"}:
        stored["name_key"] = domain.normalize_name(updated["given_name"] + updated["family_name"])
    if stored:
        await store.update_patient(session, patient["patient_id"], **stored)
    if changes.keys() & {"phone", "email", "preferred_channel", "language"}:
        await _stage_contact(session, UUID(patient["patient_id"]), patient["site_id"], updated)
    return updated


# --- episodes ---------------------------------------------------------------------------


def check_enrollment(start_date: date, today: date) -> None:
    domain.check_start_date(start_date, today)


async def enroll(
    session: AsyncSession, actor: str, patient: PatientRow, spec: dict[str, Any], today: date
) -> EnrollmentRow:
    """Open an episode in a published program of the patient's site."""
    await _check_program(session, spec["program_id"], patient["site_id"], spec["cohort"])
    return await _open_episode(session, actor, patient, spec, today, None)


async def _check_program(session: AsyncSession, program_id: str, site_id: str, cohort: str) -> None:
    program = await store.get_program(session, program_id)
    if program is None or program["site_id"] != site_id:
        raise DomainError("invalid", "unknown program", fields={"program_id": "not a published program of this site"})
    if program["cohort"] != cohort:
        raise DomainError(
            "invalid", "the program serves another cohort", fields={"cohort": f"program is for {program['cohort']}"}
        )


async def _open_episode(
    session: AsyncSession,
    actor: str,
    patient: PatientRow,
    spec: dict[str, Any],
    today: date,
    cause: Envelope | None,
) -> EnrollmentRow:
    """Create an enrollment (pending or active) and stage PatientEnrolled."""
    patient_id = patient["patient_id"]
    # The patient row's lock serializes concurrent enrollments: one open episode, even on PostgreSQL.
    await store.lock_patient(session, patient_id)
    domain.check_can_enroll(await store.open_enrollment_count(session, patient_id, list(OPEN)))
    enrollment_id = uuid4()
    status = domain.initial_status(spec["start_date"], today)
    event = PatientEnrolled(patient_id=UUID(patient_id), enrollment_id=enrollment_id, **spec)
    # The episode's correlation id is its PatientEnrolled's: later events of it join that chain.
    envelope = await store.outbox.emit(session, event, patient["site_id"], cause=cause)
    enrollment = await store.add_enrollment(
        session,
        enrollment_id=str(enrollment_id),
        patient_id=patient_id,
        site_id=patient["site_id"],
        status=str(status),
        correlation_id=str(envelope.correlation_id),
        **spec,
    )
    # Nothing reads the new episode's history before the commit (an answer is built from its row).
    await store.add_history(session, str(enrollment_id), "created", actor, to_value=str(status), at_commit=True)
    return enrollment


async def activate_due_enrollments(session: AsyncSession, now: datetime) -> int:
    """The activation job: pending episodes whose start date has come (in the site's own
    calendar) become active."""
    activated = 0
    for enrollment in await store.pending_enrollments(session):
        if enrollment["start_date"] <= now.astimezone(ZoneInfo(enrollment["timezone"])).date():
            activated += await activate(session, enrollment)
    return activated


async def activate(session: AsyncSession, enrollment: EnrollmentRow) -> bool:
    """Activate one episode as read; False if it changed since (a discharge committed
    since the read must not be undone)."""
    domain.check_transition(domain.EnrollmentStatus(enrollment["status"]), domain.EnrollmentStatus.ACTIVE)
    if not await store.change_status_if(session, enrollment["enrollment_id"], enrollment["status"], "active"):
        return False
    await store.add_history(
        session, enrollment["enrollment_id"], "activated", "system", from_value=enrollment["status"], to_value="active"
    )
    return True


async def change_level(
    session: AsyncSession, actor: str, enrollment: EnrollmentRow, level_of_care: str, reason: str | None
) -> EnrollmentRow:
    """Step-down or step-up between ASAM levels within the episode, kept as history."""
    if enrollment["status"] not in OPEN:
        raise DomainError("conflict", f"a {enrollment['status']} enrollment cannot change level")
    change = domain.level_change(enrollment["level_of_care"], level_of_care)
    await store.update_enrollment(session, enrollment["enrollment_id"], level_of_care=level_of_care)
    await store.add_history(
        session,
        enrollment["enrollment_id"],
        str(change),
        actor,
        from_value=enrollment["level_of_care"],
        to_value=level_of_care,
        reason=reason,
    )
    return await _reloaded(session, enrollment["enrollment_id"])


def check_transfer(effective_on: date, today: date) -> None:
    if effective_on < today - timedelta(days=30):
        raise DomainError(
            "invalid", "effective_on is too far in the past", fields={"effective_on": "more than 30 days ago"}
        )


async def transfer(
    session: AsyncSession,
    principal: Principal,
    enrollment: EnrollmentRow,
    destination: dict[str, Any],
    today: date,
) -> EnrollmentRow:
    """End the episode at this site (transferred) and open one at the receiving site
    (`destination`: to_site_id, to_program_id, effective_on). Returns the new episode.

    PatientTransferred is staged under both sites' subjects, so both sites' subscribers
    see it; PatientEnrolled follows for the new episode."""
    to_site_id, effective_on = destination["to_site_id"], destination["effective_on"]
    if to_site_id == enrollment["site_id"]:
        raise DomainError("invalid", "a transfer goes to another site", fields={"to_site_id": "same site"})
    await _check_destination(session, principal, to_site_id, destination["to_program_id"], enrollment["cohort"])
    domain.check_transition(domain.EnrollmentStatus(enrollment["status"]), domain.EnrollmentStatus.TRANSFERRED)
    enrollment_id = enrollment["enrollment_id"]
    await store.update_enrollment(session, enrollment_id, status="transferred", ended_on=effective_on)
    await store.add_history(
        session, enrollment_id, "transferred", principal.sub, from_value=enrollment["site_id"], to_value=to_site_id
    )
    event = PatientTransferred(
        patient_id=UUID(enrollment["patient_id"]),
        enrollment_id=UUID(enrollment_id),
        from_site_id=enrollment["site_id"],
        **destination,
    )
    first = await store.outbox.emit(session, event, enrollment["site_id"], chain=_episode(enrollment))
    await store.outbox.emit(session, event, to_site_id, cause=first)
    await store.update_patient(session, enrollment["patient_id"], site_id=to_site_id)
    patient = await store.get_patient(session, enrollment["patient_id"])
    assert patient is not None
    spec = {
        "program_id": destination["to_program_id"],
        "level_of_care": enrollment["level_of_care"],
        "cohort": enrollment["cohort"],
        "start_date": effective_on,
        "referral_source": enrollment["referral_source"],
    }
    return await _open_episode(session, principal.sub, patient, spec, today, first)


def _unknown_destination() -> DomainError:
    return DomainError(
        "invalid",
        "unknown destination",
        fields={"to_site_id": "not a site you serve", "to_program_id": "not a published program of that site"},
    )


async def _check_destination(
    session: AsyncSession, principal: Principal, to_site_id: str, to_program_id: str, cohort: str
) -> None:
    """The receiving site must be one the caller serves (network admins serve all). A site
    the caller does not serve, a site that does not exist and a program the site does not
    publish answer alike: the answer must not tell which site ids exist."""
    if not principal.sees_site(to_site_id) or await store.get_site(session, to_site_id) is None:
        raise _unknown_destination()
    program = await store.get_program(session, to_program_id)
    if program is None or program["site_id"] != to_site_id:
        raise _unknown_destination()
    if program["cohort"] != cohort:
        raise DomainError(
            "invalid",
            "the program serves another cohort",
            fields={"to_program_id": f"program is for {program['cohort']}"},
        )


def check_discharge(discharged_on: date, today: date) -> None:
    if discharged_on > today + timedelta(days=1):
        raise DomainError("invalid", "discharged_on is in the future", fields={"discharged_on": "in the future"})


async def discharge(
    session: AsyncSession, actor: str, enrollment: EnrollmentRow, reason: str, discharged_on: date
) -> EnrollmentRow:
    domain.check_transition(domain.EnrollmentStatus(enrollment["status"]), domain.EnrollmentStatus.DISCHARGED)
    if discharged_on < enrollment["start_date"] and enrollment["status"] == "active":
        raise DomainError(
            "invalid", "discharged before the episode started", fields={"discharged_on": "before start_date"}
        )
    enrollment_id = enrollment["enrollment_id"]
    await store.update_enrollment(session, enrollment_id, status="discharged", ended_on=discharged_on)
    await store.add_history(
        session,
        enrollment_id,
        "discharged",
        actor,
        from_value=enrollment["status"],
        to_value="discharged",
        reason=reason,
    )
    event = PatientDischarged(
        patient_id=UUID(enrollment["patient_id"]),
        enrollment_id=UUID(enrollment_id),
        reason=cast(DischargeReason, reason),
        discharged_on=discharged_on,
    )
    await store.outbox.emit(session, event, enrollment["site_id"], chain=_episode(enrollment))
    return await _reloaded(session, enrollment_id)


# --- consents (42 CFR Part 2) -------------------------------------------------------------


def check_consent(spec: dict[str, Any], now: datetime) -> None:
    domain.check_consent_dates(spec["signed_at"], spec["expires_on"], spec["expires_event"], now)


async def grant_consent(session: AsyncSession, patient: PatientRow, spec: dict[str, Any]) -> UUID:
    consent_id = uuid4()
    await store.add_consent(
        session, consent_id=str(consent_id), patient_id=patient["patient_id"], site_id=patient["site_id"], **spec
    )
    event = ConsentGranted(consent_id=consent_id, patient_id=UUID(patient["patient_id"]), **_terms(spec))
    await store.outbox.emit(session, event, patient["site_id"])
    return consent_id


def _terms(consent: Mapping[str, Any]) -> dict[str, Any]:
    """What the bus carries of a consent: who may receive it, why, until when. Never the
    `information` it covers: free text, which stays in intake's database."""
    return {k: consent[k] for k in ("recipient", "purpose", "expires_on", "expires_event")}


async def consent_state(session: AsyncSession, consent: ConsentRow, today: date) -> domain.ConsentState:
    ended = await _treatment_ended_since(session, consent["patient_id"], consent["signed_at"])
    return domain.consent_state(
        revoked_at=consent["revoked_at"],
        expires_on=consent["expires_on"],
        expires_event=consent["expires_event"],
        today=today,
        episode_ended=ended,
    )


async def _treatment_ended_since(session: AsyncSession, patient_id: str, signed_at: datetime) -> bool:
    """'End of treatment' for a consent: a discharge on or after the day it was signed.
    A transfer continues treatment elsewhere; a later re-enrollment does not revive it."""
    return any(
        e["status"] == "discharged" and e["ended_on"] is not None and e["ended_on"] >= signed_at.date()
        for e in await store.patient_enrollments(session, patient_id)
    )


def check_revocation_time(revoked_at: datetime, now: datetime) -> None:
    # A few minutes' grace: the client's clock may run a little ahead of ours.
    if revoked_at > now + timedelta(minutes=5):
        raise DomainError("invalid", "revoked_at is in the future", fields={"revoked_at": "in the future"})


async def revoke_consent(
    session: AsyncSession,
    consent: ConsentRow,
    patient: PatientRow,
    revoked_at: datetime,
    note: str | None,
    today: date,
) -> None:
    """Revocation in writing (sec. 2.31): the time it was made and an optional note."""
    domain.check_revocation(await consent_state(session, consent, today))
    if revoked_at < consent["signed_at"]:
        raise DomainError("invalid", "revoked before it was signed", fields={"revoked_at": "before signed_at"})
    await store.revoke_consent(session, consent["consent_id"], revoked_at, note)
    event = ConsentRevoked(
        consent_id=UUID(consent["consent_id"]), patient_id=UUID(consent["patient_id"]), **_terms(consent)
    )
    await store.outbox.emit(session, event, patient["site_id"])


# --- daily check-ins ------------------------------------------------------------------------


async def check_in_subjects(session: AsyncSession, patient_ids: list[str]) -> dict[str, store.CheckInSubject]:
    """The patients of a check-in group with their open episodes and recent cravings (the
    missing ones absent), read in one query for the API's scope check and for scoring."""
    return await store.check_in_subjects(session, patient_ids, list(OPEN))


@dataclass(frozen=True)
class Submission:
    """One check-in of a group: the patient its caller may see (api.py checked) with their
    open episode, the answers, and the request's trace context (its event continues the
    request's trace)."""

    principal: Principal
    subject: store.CheckInSubject
    answers: dict[str, Any]
    trace_context: str | None = None


async def record_check_ins(
    session: AsyncSession, submissions: list[Submission], now: Callable[[], datetime]
) -> list[dict[str, Any] | DomainError]:
    """Score each check-in for risk against its episode's recent cravings, record it with
    the plan goals it reports progress on, and publish it (without its free text).

    Set-based, for a group of submissions sharing one transaction (api.py's group commit):
    the episodes and cravings came with the patients (check_in_subjects), the goals are
    read in one query and the rows written in one multi-row INSERT per table, so the
    statements are paid per group, not per check-in. Each is scored with the earlier ones
    of the same group counted. A refused one (no open enrollment, a goal not in the plan)
    is answered with its DomainError and writes nothing; the others are not affected."""
    reporting: list[str] = []
    # One list per episode, shared by the group's check-ins of it: each counts the earlier.
    cravings: dict[str, list[int]] = {}
    for submission in submissions:
        if (episode := submission.subject.episode) is not None:
            cravings.setdefault(episode["enrollment_id"], list(submission.subject.recent_cravings))
            if submission.answers["goal_progress"]:
                reporting.append(episode["enrollment_id"])
    goals = await store.goal_ids_of(session, reporting) if reporting else {}
    outcomes: list[dict[str, Any] | DomainError] = []
    check_ins: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []
    staged: list[tuple[Envelope, str | None]] = []
    for submission in submissions:
        enrollment = submission.subject.episode
        if enrollment is None:
            outcomes.append(DomainError("conflict", "check-ins need an open enrollment"))
            continue
        answers, enrollment_id = submission.answers, enrollment["enrollment_id"]
        refusal = _unknown_goal(goals.get(enrollment_id, set()), answers["goal_progress"])
        if refusal is not None:
            outcomes.append(refusal)
            continue
        recent = cravings[enrollment_id]
        risk, reasons = domain.score_risk(
            mood=answers["mood"],
            craving=answers["craving"],
            used_since_last=answers["used_since_last"],
            safety_concern=answers["safety_concern"],
            previous_cravings=recent[-2:],
        )
        recent.append(answers["craving"])
        check_in_id, submitted_at = uuid4(), now()
        check_ins.append(_check_in_row(submission, enrollment, check_in_id, submitted_at, str(risk), reasons))
        progress.extend(
            {
                "goal_id": str(p["goal_id"]),
                "check_in_id": str(check_in_id),
                "note": p["note"],
                "actor": submission.principal.sub,
            }
            for p in answers["goal_progress"]
        )
        event = CheckInSubmitted(
            check_in_id=check_in_id,
            patient_id=UUID(enrollment["patient_id"]),
            enrollment_id=UUID(enrollment_id),
            submitted_at=submitted_at,
            **{k: answers[k] for k in ("mood", "craving", "used_since_last", "safety_concern")},
            risk=cast(Risk, str(risk)),
        )
        staged.append(
            (envelope_for(event, enrollment["site_id"], chain=_episode(enrollment)), submission.trace_context)
        )
        outcomes.append(
            {
                "check_in_id": check_in_id,
                "patient_id": enrollment["patient_id"],
                "enrollment_id": enrollment_id,
                "site_id": enrollment["site_id"],
                "submitted_at": submitted_at,
                "risk": str(risk),
                "risk_reasons": reasons,
            }
        )
    await store.add_check_ins(session, check_ins)
    await store.add_progress_many(session, progress)
    await store.outbox.stage(session, *(e for e, _ in staged), trace_contexts=[c for _, c in staged])
    return outcomes


def _check_in_row(
    submission: Submission,
    enrollment: EnrollmentRow,
    check_in_id: UUID,
    submitted_at: datetime,
    risk: str,
    reasons: list[str],
) -> dict[str, Any]:
    answers = submission.answers
    return {
        "check_in_id": str(check_in_id),
        "patient_id": enrollment["patient_id"],
        "enrollment_id": enrollment["enrollment_id"],
        "site_id": enrollment["site_id"],
        "submitted_at": submitted_at,
        "submitted_by": submission.principal.sub,
        "submitted_role": submission.principal.role,
        **{k: answers[k] for k in ("mood", "craving", "used_since_last", "sleep_hours", "safety_concern")},
        "substances": json.dumps(answers["substances"]),
        "goals": answers["goals"],
        "challenges": answers["challenges"],
        "risk": risk,
        "risk_reasons": json.dumps(reasons),
    }


def _unknown_goal(goals: set[str], progress: list[dict[str, Any]]) -> DomainError | None:
    for index, entry in enumerate(progress):
        if str(entry["goal_id"]) not in goals:
            return DomainError(
                "invalid",
                "not a goal of this episode's plan",
                fields={f"goal_progress.{index}.goal_id": "unknown goal"},
            )
    return None


# --- recovery plan ------------------------------------------------------------------------


async def add_goal(session: AsyncSession, enrollment: EnrollmentRow, spec: dict[str, Any]) -> None:
    if enrollment["status"] not in OPEN:
        raise DomainError("conflict", f"a {enrollment['status']} enrollment's plan is closed")
    await store.add_goal(
        session,
        goal_id=str(uuid4()),
        plan_id=str(domain.plan_id_of(enrollment["enrollment_id"])),
        enrollment_id=enrollment["enrollment_id"],
        status="active",
        **spec,
    )
    await _stage_plan(session, enrollment)


async def change_goal(
    session: AsyncSession,
    actor: str,
    goal: GoalRow,
    enrollment: EnrollmentRow,
    changes: dict[str, Any],
    note: str | None,
) -> None:
    """Change a goal; a status change (met, dropped, reopened) is progress, and published."""
    if "status" in changes:
        domain.check_goal_status_change(goal["status"], changes["status"])
    if changes:
        await store.update_goal(session, goal["goal_id"], **changes)
    if "status" in changes or note:
        await store.add_progress(session, goal_id=goal["goal_id"], note=note, status=changes.get("status"), actor=actor)
    if "status" in changes:
        await _stage_plan(session, enrollment)


async def _stage_plan(session: AsyncSession, enrollment: EnrollmentRow) -> None:
    goals = await store.plan_goals_of(session, enrollment["enrollment_id"])
    event = TreatmentPlanUpdated(
        patient_id=UUID(enrollment["patient_id"]),
        enrollment_id=UUID(enrollment["enrollment_id"]),
        plan_id=domain.plan_id_of(enrollment["enrollment_id"]),
        goals=[GoalStatus(goal_id=UUID(g["goal_id"]), status=cast(GoalState, g["status"])) for g in goals],
    )
    await store.outbox.emit(session, event, enrollment["site_id"], chain=_episode(enrollment))


# --- potential duplicates (network admins) -----------------------------------------------------


async def resolve_duplicate(
    session: AsyncSession, duplicate_id: str, resolution: Literal["linked", "dismissed"], actor: str
) -> DuplicateRow:
    """Resolve a queue entry once; returns it as resolved (the records are not merged)."""
    if await store.get_potential_duplicate(session, duplicate_id) is None:
        raise DomainError("not_found", "potential duplicate not found")
    if not await store.resolve_potential_duplicate(session, duplicate_id, resolution, actor):
        raise DomainError("conflict", "this potential duplicate is already resolved")
    row = await store.get_potential_duplicate(session, duplicate_id)
    assert row is not None
    return row


# --- events in ------------------------------------------------------------------------------


async def project_program(session: AsyncSession, event: ProgramPublished, site_id: str, published_at: datetime) -> None:
    """Keep the catalogue of programs a patient can be enrolled in (scheduling owns them)."""
    await store.upsert_program(
        session,
        event.program_id,
        site_id=site_id,
        name=event.name,
        cohort=event.cohort,
        level_of_care=event.level_of_care,
        published_at=published_at,
    )


# --- consent-gated feeds and the accounting of disclosures (issue 11) ---------------------------


# A new feed-lane durable starts this long before the oldest consent integration was
# registered: a clock here ahead of the broker's loses none of the events after it.
FEED_START_MARGIN = timedelta(minutes=1)


async def feed_interest(session: AsyncSession, event_types: list[str]) -> Interest:
    """What the feed lane reads: the public events of the sites some active consent-based
    integration covers, none at all without one (the lane then lies dormant). Its durable,
    created when the first such integration is registered, starts just before that."""
    active = [r for r in await store.list_integrations(session, active_only=True) if r["basis"] == "consent"]
    sites = {site for r in active for site in json.loads(r["sites"])}
    since = min((r["created_at"] for r in active), default=None)
    return Interest(
        wanted=frozenset((name, site) for name in event_types for site in sites),
        since=min(since, clock.now()) - FEED_START_MARGIN if since else None,
    )


async def forward_to_feeds(session: AsyncSession, envelope: Envelope, event: Event) -> int:
    """Forward a public event into the feed of each consent-based integration of its site
    that may have it: about no patient, if it is context (domain.FEED_CONTEXT_EVENTS);
    about a patient, only under that patient's consent naming the integration for its
    purpose, and then entered in the patient's accounting of disclosures, in the same
    transaction as the forward. Returns how many feeds it went to."""
    patient_id = getattr(event, "patient_id", None)
    if patient_id is None and envelope.event_type not in domain.FEED_CONTEXT_EVENTS:
        return 0
    now = clock.now()
    forwarded = 0
    for integration in await store.consent_integrations(session, envelope.site_id):
        recipient, purpose = f"org:{integration['integration_id']}", integration["purpose"]
        assert purpose is not None  # basis consent always has one (domain.check_integration_basis)
        if patient_id is not None and not await _consented(session, str(patient_id), recipient, purpose, envelope):
            continue
        staged = await store.outbox.forward(
            session,
            str(uuid5(envelope.event_id, integration["integration_id"])),
            domain.feed_subject(integration["integration_id"], envelope.subject),
            envelope,
        )
        forwarded += staged
        if staged and patient_id is not None:
            await store.add_disclosure(
                session,
                patient_id=str(patient_id),
                site_id=envelope.site_id,
                recipient=recipient,
                purpose=purpose,
                channel="feed",
                event_type=envelope.event_type,
                event_id=str(envelope.event_id),
                disclosed_at=now,
            )
    return forwarded


async def _consented(session: AsyncSession, patient_id: str, recipient: str, purpose: str, envelope: Envelope) -> bool:
    today = clock.today()
    for consent in await store.consents_to(session, patient_id, recipient, purpose):
        state = await consent_state(session, consent, today)
        if domain.consent_covers_event(
            state=state, recorded_at=consent["created_at"], occurred_at=envelope.occurred_at
        ):
            return True
    return False


async def record_disclosure(session: AsyncSession, envelope: Envelope, event: DisclosureRecorded) -> None:
    """A webhook's delivery under consent, reported by notifications (once: the inbox)."""
    await store.add_disclosure(
        session,
        patient_id=str(event.patient_id),
        site_id=envelope.site_id,
        recipient=event.recipient,
        purpose=event.purpose,
        channel=event.channel,
        event_type=event.event_type,
        event_id=str(event.event_id),
        disclosed_at=event.disclosed_at,
    )


def disclosure_purge(retention: timedelta) -> Callable[[AsyncSession, datetime], Awaitable[int]]:
    """The daily job: accounting entries older than `retention` go."""

    async def purge(session: AsyncSession, now: datetime) -> int:
        return await store.purge_disclosures(session, now - retention)

    return purge
