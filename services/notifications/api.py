"""Notifications HTTP API."""

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from services.notifications import store
from shared.audit import record_access
from shared.auth import Principal, ensure_site, require_roles
from shared.errors import NotFound
from shared.http import Db

router = APIRouter()

Staff = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk"))]


class NotificationOut(BaseModel):
    notification_id: UUID
    site_id: str
    recipient_kind: str
    channel: str
    template: str
    status: str
    attempts: int
    cause_event_id: UUID
    created_at: datetime
    sent_at: datetime | None


@router.get("/patients/{patient_id}/notifications", response_model=list[NotificationOut], tags=["patients"])
async def patient_notifications(patient_id: UUID, principal: Staff, session: Db) -> list[NotificationOut]:
    async with session.begin():
        contact = await store.get_contact(session, str(patient_id))
        rows = await store.patient_notifications(session, str(patient_id))
        site_id = contact["site_id"] if contact else (rows[0]["site_id"] if rows else None)
        if site_id is None:
            raise NotFound("patient not found")
        ensure_site(principal, site_id, "patient")
        await record_access(
            session,
            store.audit,
            principal,
            action="notifications.read",
            site_id=site_id,
            patient_id=patient_id,
        )
    return [NotificationOut(**{k: v for k, v in r.items() if k in NotificationOut.model_fields}) for r in rows]
