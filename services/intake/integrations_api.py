"""Outside systems that read iopnet's events (issue 11), HTTP in: network admins add an
integration for some sites on a basis (`qsoa` or `consent`), rotate its broker password,
revoke it (IntegrationRegistered / IntegrationRevoked tell notifications, whose webhooks
follow the same basis). The password is answered once and kept as a bcrypt hash; the broker learns the
hashes from `GET /integrations/broker-users` (`iopnet integrations sync` writes them into
nats-server's config and reloads it: docs/events.md)."""

import asyncio
import json
import secrets
from typing import Annotated, Literal

import bcrypt
from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.intake import domain, store
from services.intake.store import IntegrationRow
from shared import clock
from shared.api import Input
from shared.auth import NetworkAdmin, Principal
from shared.contracts.events import IntegrationRegistered, IntegrationRevoked, SiteId
from shared.db import transaction
from shared.errors import Conflict, Invalid, NotFound
from shared.http import Db, RefreshInterests
from shared.messaging.integrations import integration_consumers, integration_inbox, integration_user

router = APIRouter(tags=["integrations"])

IntegrationId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,30}$")]
# nats-server's own `passwd` tool uses cost 11: a check costs it ~0.1 s per connect.
BCRYPT_ROUNDS = 11


class IntegrationIn(Input):
    integration_id: IntegrationId
    sites: Annotated[list[SiteId], Field(min_length=1, max_length=200)]
    basis: Literal["qsoa", "consent"]
    # basis consent: the purpose a patient's consent must name for an event to be forwarded.
    purpose: domain.ConsentPurpose | None = None


class ConsumerOut(BaseModel):
    stream: str
    durable: str
    filter_subject: str


class IntegrationOut(BaseModel):
    integration_id: str
    sites: list[str]
    basis: str
    purpose: str | None
    status: str
    nats_user: str
    inbox_prefix: str
    consumers: list[ConsumerOut]


class IntegrationCredentials(IntegrationOut):
    password: str = Field(description="shown once: iopnet keeps only its bcrypt hash")


class BrokerUser(BaseModel):
    integration_id: str
    sites: list[str]
    basis: str
    password_hash: str


def _out(row: IntegrationRow) -> IntegrationOut:
    sites = json.loads(row["sites"])
    consumers = integration_consumers(row["integration_id"], tuple(sites), row["basis"])
    return IntegrationOut(
        integration_id=row["integration_id"],
        sites=sites,
        basis=row["basis"],
        purpose=row["purpose"],
        status=row["status"],
        nats_user=integration_user(row["integration_id"]),
        inbox_prefix=integration_inbox(row["integration_id"]),
        consumers=[ConsumerOut(**c.__dict__) for c in consumers],
    )


async def _new_password() -> tuple[str, str]:
    password = secrets.token_urlsafe(32)
    # bcrypt is slow on purpose: off the event loop.
    hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS))
    return password, hashed.decode()


async def _audit(db: Db, principal: Principal, action: str, row: IntegrationRow) -> None:
    # A site's admins see in its audit trail every grant of its events to an outside system.
    for site_id in json.loads(row["sites"]):
        await store.record_access(db, principal, action, site_id, None)


@router.post("/integrations", status_code=201, response_model=IntegrationCredentials)
async def add_integration(
    body: IntegrationIn, principal: NetworkAdmin, db: Db, refresh_interests: RefreshInterests
) -> IntegrationCredentials:
    domain.check_integration_basis(body.basis, body.purpose)
    sites = sorted(set(body.sites))
    password, hashed = await _new_password()
    async with transaction(db):
        known = {s["site_id"] for s in await store.list_sites(db, sites)}
        if unknown := [s for s in sites if s not in known]:
            raise Invalid("unknown site", fields={"sites": f"no such site: {', '.join(unknown)}"})
        added = await store.add_integration(
            db,
            integration_id=body.integration_id,
            sites=json.dumps(sites),
            basis=body.basis,
            purpose=body.purpose,
            password_hash=hashed,
            created_by=principal.sub,
        )
        if not added:
            raise Conflict(f"integration {body.integration_id} already exists")
        row = await store.get_integration(db, body.integration_id)
        assert row is not None  # added above, in this transaction
        await _audit(db, principal, "integration.add", row)
        for site_id in sites:  # notifications' webhooks follow the same basis
            event = IntegrationRegistered(
                integration_id=body.integration_id, sites=sites, basis=body.basis, purpose=body.purpose
            )
            await store.outbox.emit(db, event, site_id)
    await refresh_interests()  # a consent-based one wakes the feed lane for its sites
    return IntegrationCredentials(**_out(row).model_dump(), password=password)


@router.get("/integrations", response_model=list[IntegrationOut])
async def list_integrations(principal: NetworkAdmin, db: Db) -> list[IntegrationOut]:
    async with transaction(db):
        return [_out(row) for row in await store.list_integrations(db)]


@router.get("/integrations/broker-users", response_model=list[BrokerUser])
async def broker_users(principal: NetworkAdmin, db: Db) -> list[BrokerUser]:
    """The active integrations as nats-server admits them (bcrypt hashes, never passwords)."""
    async with transaction(db):
        rows = await store.list_integrations(db, active_only=True)
    return [
        BrokerUser(
            integration_id=r["integration_id"],
            sites=json.loads(r["sites"]),
            basis=r["basis"],
            password_hash=r["password_hash"],
        )
        for r in rows
    ]


async def _active(db: Db, integration_id: str) -> IntegrationRow:
    row = await store.get_integration(db, integration_id, lock=True)
    if row is None:
        raise NotFound("integration not found")
    if row["status"] != "active":
        raise Conflict("integration is revoked")
    return row


@router.post("/integrations/{integration_id}/rotate", response_model=IntegrationCredentials)
async def rotate_integration(integration_id: IntegrationId, principal: NetworkAdmin, db: Db) -> IntegrationCredentials:
    """A new broker password; the old one stops working at the broker's next reload."""
    password, hashed = await _new_password()
    async with transaction(db):
        row = await _active(db, integration_id)
        await store.update_integration(db, integration_id, password_hash=hashed, rotated_at=clock.now())
        await _audit(db, principal, "integration.rotate", row)
    return IntegrationCredentials(**_out(row).model_dump(), password=password)


@router.post("/integrations/{integration_id}/revoke", response_model=IntegrationOut)
async def revoke_integration(
    integration_id: IntegrationId, principal: NetworkAdmin, db: Db, refresh_interests: RefreshInterests
) -> IntegrationOut:
    """Revoked for good (add a new one to start again); the broker closes its connections
    at its next reload."""
    async with transaction(db):
        row = await _active(db, integration_id)
        await store.update_integration(db, integration_id, status="revoked", revoked_at=clock.now())
        await _audit(db, principal, "integration.revoke", row)
        for site_id in json.loads(row["sites"]):
            await store.outbox.emit(db, IntegrationRevoked(integration_id=integration_id), site_id)
    await refresh_interests()
    return _out({**row, "status": "revoked"})
