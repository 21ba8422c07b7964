"""`iopnet integrations`: outside systems that read the events of their sites (issue 11).

Intake keeps the records (POST /integrations and friends; network admins only). The
broker learns who may connect from them: `sync` writes the active integrations' bcrypt
hashes into nats-server's configuration and has the running server reload it. A reload,
not JWT-based decentralized auth, because the rest of iopnet's users live in that same
file with allow-lists (iopnet/natsd.py), and a reload adds, rotates or removes a user
without a restart and closes a removed user's connections. For the embedded server of
`iopnet run` this is done here; for a server of your own, `sync --write FILE` writes the
users and you reload it (`nats-server --signal reload`, or the Helm chart's reloader).
"""

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from iopnet.natsd import (
    IntegrationUser,
    NatsServer,
    deployed_accounts_block,
    embedded_data_dir,
    read_credentials,
    write_integrations,
)
from shared.auth import mint_token
from shared.messaging.integrations import integration_user
from shared.settings import Settings

integrations_app = typer.Typer(
    help="Outside systems (EHRs, billing, analytics) that read events: docs/events.md.", no_args_is_help=True
)


def _intake(settings: Settings) -> httpx.Client:
    token = mint_token(settings.signing_secret, sub="iopnet-cli", role="network_admin", issuer=settings.jwt_issuer)
    return httpx.Client(base_url=settings.base_url("intake"), headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _answer(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        detail = f"{error['message']} {error.get('fields') or ''}".strip()
    except (ValueError, KeyError):
        detail = response.text[:200]
    typer.echo(f"intake answered {response.status_code}: {detail}", err=True)
    raise typer.Exit(1)


def sync_broker(settings: Settings, write: str | None = None) -> int:
    """Give the broker the active integrations; returns how many."""
    with _intake(settings) as intake:
        users = [
            IntegrationUser(u["integration_id"], tuple(u["sites"]), u["basis"], u["password_hash"])
            for u in _answer(intake.get("/integrations/broker-users"))
        ]
    if write is not None:
        Path(write).write_text(deployed_accounts_block(users))
        return len(users)
    if settings.nats_url is not None:
        typer.echo("IOPNET_NATS_URL names a server of your own: use --write FILE and reload it", err=True)
        raise typer.Exit(2)
    data_dir = embedded_data_dir(settings.data_dir)
    credentials = read_credentials(data_dir)
    if credentials is None:
        typer.echo(f"no embedded nats-server in {data_dir}: start `iopnet run` first", err=True)
        raise typer.Exit(2)
    write_integrations(data_dir, users)
    server = NatsServer(data_dir, settings.embedded_nats_host, settings.embedded_nats_port, users=credentials)
    try:
        server.reload()
    except (FileNotFoundError, ProcessLookupError):
        typer.echo("the embedded nats-server is not running: it reads the integrations when it starts", err=True)
    return len(users)


def _print_credentials(created: dict[str, Any]) -> None:
    typer.echo(f"integration {created['integration_id']} ({created['basis']}) for {', '.join(created['sites'])}")
    typer.echo(f"  NATS user:     {created['nats_user']}")
    typer.echo(f"  NATS password: {created['password']}   (shown once; iopnet keeps only its hash)")
    typer.echo(f"  inbox prefix:  {created['inbox_prefix']}")
    for consumer in created["consumers"]:
        typer.echo(f"  durable {consumer['durable']} on {consumer['stream']}, filter {consumer['filter_subject']}")


@integrations_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="the integration's id: a slug, e.g. acme-ehr")],
    site: Annotated[list[str], typer.Option("--site", help="a site whose events it reads; repeat for several")],
    basis: Annotated[str, typer.Option(help="qsoa (reads its sites' public events) or consent (its own feed)")],
    purpose: Annotated[str | None, typer.Option(help="basis consent: the consent purpose it relies on")] = None,
) -> None:
    """Add an integration, print its broker credentials once, and admit it at the broker."""
    settings = Settings()
    body = {"integration_id": name, "sites": site, "basis": basis, "purpose": purpose}
    with _intake(settings) as intake:
        created = _answer(intake.post("/integrations", json=body))
    _print_credentials(created)
    sync_broker(settings)


@integrations_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="the records as JSON")] = False,
) -> None:
    """The integrations, active and revoked."""
    with _intake(Settings()) as intake:
        rows = _answer(intake.get("/integrations"))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['integration_id']}\t{row['status']}\t{row['basis']}\t{','.join(row['sites'])}")


@integrations_app.command("rotate")
def rotate(name: Annotated[str, typer.Argument(help="the integration's id")]) -> None:
    """A new broker password (printed once); the old one stops working now."""
    settings = Settings()
    with _intake(settings) as intake:
        created = _answer(intake.post(f"/integrations/{name}/rotate"))
    _print_credentials(created)
    sync_broker(settings)


@integrations_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="the integration's id")]) -> None:
    """Revoke for good: the broker refuses it and closes its connections now."""
    settings = Settings()
    with _intake(settings) as intake:
        _answer(intake.post(f"/integrations/{name}/revoke"))
    sync_broker(settings)
    typer.echo(f"{integration_user(name)} revoked")


@integrations_app.command("sync")
def sync(
    write: Annotated[
        str | None, typer.Option(help="write the users' block to this file (a server of your own) instead")
    ] = None,
) -> None:
    """Give the broker the active integrations (after a restore, or for a server of your own)."""
    count = sync_broker(Settings(), write)
    typer.echo(f"{count} active integration(s) given to the broker")
