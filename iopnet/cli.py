"""`iopnet`: run the network, serve one service, mint tokens, look at events and dead letters."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import httpx
import typer

from iopnet.natsd import NatsServer
from shared.auth import ROLES, mint_token
from shared.settings import SERVICES, ServiceName, Settings

app = typer.Typer(help="iopnet: the shared backend of a network of IOP clinics.", no_args_is_help=True)
events_app = typer.Typer(help="Look at events on the bus.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: list and retry.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(dlq_app, name="dlq")


@app.command()
def serve(service: Annotated[str, typer.Argument(help="intake | scheduling | notifications")]) -> None:
    """Run one service (HTTP API, its consumers and its outbox relay)."""
    import uvicorn

    from shared.logging import configure_logging

    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    name: ServiceName = service  # type: ignore[assignment]
    settings = Settings()
    configure_logging(settings.log_level, name)
    module = __import__(f"services.{name}.app", fromlist=["create_app"])
    uvicorn.run(
        module.create_app(settings),
        host=settings.http_host,
        port=settings.port(name),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def run(demo: Annotated[bool, typer.Option("--demo", help="also seed a demo network")] = False) -> None:
    """Run the whole network locally: embedded NATS (unless IOPNET_NATS_URL) and the three services."""
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ = settings.signing_secret  # created once here, before the services race for it
    nats: NatsServer | None = None
    env = dict(os.environ)
    if settings.nats_url is None:
        nats = NatsServer(settings.data_dir / "nats", settings.embedded_nats_host, settings.embedded_nats_port)
        nats.start()
        env["IOPNET_NATS_URL"] = nats.url
        typer.echo(f"nats       {nats.url} (embedded, data in {nats.data_dir})")
    else:
        typer.echo(f"nats       {settings.nats_url}")
    children = {
        name: subprocess.Popen([sys.executable, "-m", "iopnet.cli", "serve", name], env=env) for name in SERVICES
    }
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        _wait_healthy(settings, children)
        for name in SERVICES:
            typer.echo(f"{name:<15}{settings.base_url(name)}  (docs: {settings.base_url(name)}/docs)")
        if demo:
            from iopnet.demo import seed_demo

            seed_demo(settings)
        typer.echo("iopnet is up; Ctrl-C stops it")
        while not stopping:
            died = [n for n, p in children.items() if p.poll() is not None]
            if died:
                typer.echo(f"service stopped unexpectedly: {', '.join(died)}", err=True)
                break
            time.sleep(0.2)  # supervisor tick: children are checked, not waited on
    finally:
        for process in children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in children.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if nats is not None:
            nats.stop()
        typer.echo("iopnet stopped")


def _wait_healthy(settings: Settings, children: dict[str, subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = set(children)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if children[name].poll() is not None:
                raise RuntimeError(f"{name} exited during start")
            try:
                if httpx.get(f"{settings.base_url(name)}/readyz", timeout=1).status_code == 200:  # type: ignore[arg-type]
                    pending.discard(name)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"not ready after {timeout}s: {', '.join(sorted(pending))}")


@app.command()
def token(
    role: Annotated[str, typer.Option(help=f"one of {', '.join(ROLES)}")],
    site: Annotated[list[str] | None, typer.Option("--site", help="a site id; repeat for several")] = None,
    patient_id: Annotated[str | None, typer.Option(help="for role patient")] = None,
    sub: Annotated[str | None, typer.Option(help="subject (user id); default from the role")] = None,
) -> None:
    """Print a JWT the local network accepts."""
    if role not in ROLES:
        raise typer.BadParameter(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    settings = Settings()
    typer.echo(
        mint_token(
            settings.signing_secret,
            sub=sub or f"local-{role}",
            role=role,  # type: ignore[arg-type]
            sites=site or [],
            patient_id=patient_id,
            ttl_seconds=settings.jwt_ttl_seconds,
        )
    )


@app.command("seed-demo")
def seed_demo_command() -> None:
    """Seed a demo network (sites, made-up patients, enrollments) into a running network."""
    from iopnet.demo import seed_demo

    seed_demo(Settings())


@events_app.command("tail")
def events_tail(
    subject: Annotated[str, typer.Option(help="subject filter")] = "iop.>",
    count: Annotated[int, typer.Option(help="stop after this many (0: forever)")] = 0,
) -> None:
    """Print events as they arrive (envelopes, one JSON per line)."""

    async def tail() -> None:
        import nats

        nc = await nats.connect(Settings().effective_nats_url)
        seen = 0
        done = asyncio.Event()

        async def on_message(msg: object) -> None:
            nonlocal seen
            typer.echo(json.dumps({"subject": msg.subject, "envelope": json.loads(msg.data)}))  # type: ignore[attr-defined]
            seen += 1
            if count and seen >= count:
                done.set()

        await nc.subscribe(subject, cb=on_message)
        await done.wait()
        await nc.drain()

    asyncio.run(tail())


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(help="at most this many")] = 50) -> None:
    """List dead letters with their reason (newest last)."""
    from iopnet.dlq import list_dead_letters

    for letter in asyncio.run(list_dead_letters(Settings().effective_nats_url, limit)):
        typer.echo(json.dumps(letter))


@dlq_app.command("retry")
def dlq_retry(sequence: Annotated[int, typer.Argument(help="the dead letter's sequence in IOP_DLQ")]) -> None:
    """Re-publish a dead letter to its original subject (the consumer's inbox keeps it idempotent)."""
    from iopnet.dlq import retry_dead_letter

    subject = asyncio.run(retry_dead_letter(Settings().effective_nats_url, sequence))
    typer.echo(f"re-published to {subject}")


if __name__ == "__main__":
    app()
