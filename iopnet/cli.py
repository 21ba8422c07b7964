"""`iopnet`: run the network, serve one service, mint tokens, look at events and dead letters."""

import asyncio
import json
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from iopnet.integrations import integrations_app
from shared.auth import ROLES, mint_token
from shared.settings import SERVICES, ServiceName, Settings, async_database_url

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from nats.aio.msg import Msg
    from pydantic_core import ErrorDetails
    from rich.progress import Progress

T = TypeVar("T")

app = typer.Typer(help="iopnet: the shared backend of a network of IOP clinics.", no_args_is_help=True)
events_app = typer.Typer(help="Look at events on the bus.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: list and retry.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(dlq_app, name="dlq")
app.add_typer(integrations_app, name="integrations")


@app.command()
def serve(service: Annotated[str, typer.Argument(help="intake | scheduling | notifications | console")]) -> None:
    """Run one service (HTTP API, its consumers and its outbox relay), or the console."""
    import uvicorn

    from shared.logging import configure_logging
    from shared.runtime import keep_startup_heap_out_of_collections, run_at_niceness

    settings = Settings()
    run_at_niceness(settings.cpu_nice)
    if service == "console":
        from services.console.app import create_app as console_app

        configure_logging(settings.log_level, "console")
        # An open live-alert stream (server-sent events) never ends by itself: a stop waits
        # this long for them, then closes them.
        uvicorn.run(
            console_app(settings),
            host=settings.http_host,
            port=settings.console_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        return
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    name: ServiceName = service  # type: ignore[assignment]
    configure_logging(settings.log_level, name)
    module = __import__(f"services.{name}.app", fromlist=["create_app"])
    try:
        service_app = module.create_app(settings)
    except ValueError as exc:  # a configuration this service refuses (e.g. IOPNET_LANES on SQLite)
        typer.echo(f"iopnet serve {name}: {exc}", err=True)
        raise typer.Exit(2) from None
    keep_startup_heap_out_of_collections()
    uvicorn.run(
        service_app,
        host=settings.http_host,
        port=settings.port(name),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def run(demo: Annotated[bool, typer.Option("--demo", help="also seed a demo network")] = False) -> None:
    """Run the whole network locally: embedded NATS (unless IOPNET_NATS_URL), the three services
    and the console (development sign-in: there is no identity provider here)."""
    from iopnet.natsd import CREDENTIALS_FILE
    from iopnet.network import LocalNetwork

    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    from shared.files import secure_data_dir

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    settings = Settings()
    # Before anything is written: the umask (0o077) is inherited by nats-server and the
    # services, and modes left open by an older version are closed.
    secure_data_dir(settings.data_dir)
    network = LocalNetwork(settings, console=True)
    try:
        network.start()
        embedded = ""
        if network.nats is not None:
            passwords = network.nats.data_dir / CREDENTIALS_FILE
            embedded = f" (embedded, data in {network.nats.data_dir}, users' passwords in {passwords})"
        typer.echo(f"{'nats':<15}{network.public_nats_url}{embedded}")
        for name in SERVICES:
            typer.echo(f"{name:<15}{network.url(name)}  (docs: {network.url(name)}/docs)")
        typer.echo(f"{'console':<15}{network.url('console')}  (sign in: {network.url('console')}/signin)")
        if demo:
            from iopnet.demo import seed_demo

            seed_demo(network.settings)
        typer.echo("iopnet is up; Ctrl-C stops it")

        def log(line: str) -> None:
            typer.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True)

        while not stopping:
            # A service that exits unexpectedly is restarted with backoff; the rest run on.
            network.supervise(log)
            time.sleep(0.2)  # supervisor tick: children are checked, not waited on
    finally:
        network.stop()
        typer.echo("iopnet stopped")


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
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


@app.command("seed-demo")
def seed_demo_command() -> None:
    """Seed a demo network (sites, made-up patients, enrollments) into a running network."""
    from iopnet.demo import seed_demo

    seed_demo(Settings())


@app.command()
def bench(
    patients: Annotated[int, typer.Option(help="patients enrolled, then checked in once each")] = 300,
    sites: Annotated[int, typer.Option(help="clinic sites the patients are spread over")] = 3,
    concurrency: Annotated[int, typer.Option(help="concurrent HTTP clients")] = 16,
    check_in_rate: Annotated[float, typer.Option(help="check-ins per second offered (first half)")] = 200.0,
    postgres: Annotated[
        str | None, typer.Option(help="PostgreSQL admin URL: the services' databases are created there")
    ] = None,
    results_dir: Annotated[Path, typer.Option(help="where the JSON and PNG are written")] = Path("bench/results"),
    safety_process: Annotated[
        bool | None,
        typer.Option(
            "--safety-process/--no-safety-process",
            help="notifications' safety lane in a process of its own (PostgreSQL only; default: with --postgres)",
        ),
    ] = None,
    replicas: Annotated[
        str,
        typer.Option(
            help="processes per service (PostgreSQL only): N for each, or e.g. intake=2,notifications=2",
        ),
    ] = "1",
) -> None:
    """Benchmark a private local network at scale against the raw bus (see iopnet/bench.py)."""
    from iopnet.bench import BenchConfig, main
    from iopnet.network import service_replicas
    from shared.runtime import keep_startup_heap_out_of_collections

    if safety_process and postgres is None:
        raise typer.BadParameter(
            "needs --postgres: on SQLite one process reads every lane", param_hint="--safety-process"
        )
    try:
        processes = service_replicas(replicas)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--replicas") from None
    if any(count > 1 for count in processes.values()) and postgres is None:
        raise typer.BadParameter("needs --postgres: SQLite takes one process", param_hint="--replicas")
    if postgres is not None:
        try:
            postgres = async_database_url(postgres)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--postgres") from None
        if not postgres.startswith("postgresql+asyncpg://"):
            raise typer.BadParameter("a PostgreSQL URL: postgresql://user@host:5432/name", param_hint="--postgres")
    # The load generator's own full collections would pause it mid-wave, and its pause
    # would be read as the network's latency.
    keep_startup_heap_out_of_collections()
    main(BenchConfig(patients=patients, sites=sites, concurrency=concurrency, check_in_rate=check_in_rate,
                     postgres=postgres, results_dir=results_dir, safety_process=safety_process,
                     replicas=processes))  # fmt: skip


@app.command("bench-consumer")
def bench_consumer(
    messages: Annotated[int, typer.Option(help="events to drain per round")] = 5000,
    rounds: Annotated[int, typer.Option(help="alternating rounds; the best of each is kept")] = 3,
) -> None:
    """Benchmark the consumer against a raw nats-py pull consumer in the same run."""
    from iopnet.bench_consumer import main

    main(messages, rounds)


def _ops_nats_url() -> str:
    """IOPNET_NATS_URL if set; else the local embedded server as its `ops` user (the
    password is in <data_dir>/nats/credentials.json, written by `iopnet run`)."""
    from iopnet.natsd import ops_url

    settings = Settings()
    return settings.nats_url or ops_url(settings.data_dir, settings.effective_nats_url)


def _tail_line(msg: "Msg") -> dict[str, object]:
    """One message as `events tail` prints it: the envelope, and the headers of a dead
    letter (its reason). A message that is not JSON (a restricted dead letter has an
    empty payload; a poison message may be anything) is shown by its headers and size."""
    headers = dict(msg.headers or {})
    line: dict[str, object] = {"subject": msg.subject}
    try:
        line["envelope"] = json.loads(msg.data)
    except ValueError:
        line["payload_bytes"] = len(msg.data)
        if headers.get("Iop-Payload-Withheld"):
            line["payload_withheld"] = headers["Iop-Payload-Withheld"]
        elif msg.data:
            line["payload"] = msg.data.decode(errors="replace")
    if headers and (msg.subject.startswith("iop.dlq.") or "envelope" not in line):
        line["headers"] = headers
    return line


@events_app.command("tail")
def events_tail(
    subject: Annotated[
        list[str] | None, typer.Option(help="subject filter, repeatable (default: every public subject)")
    ] = None,
    count: Annotated[int, typer.Option(help="stop after this many (0: forever)")] = 0,
) -> None:
    """Print events as they arrive (envelopes, one JSON per line). As the `ops` user it
    sees every public subject; `iop.restricted.>` (contact details) is refused."""
    denied: list[str] = []

    async def tail() -> None:
        from iopnet.natsd import OBSERVED_SUBJECTS
        from shared.messaging.connection import connect_once

        done = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if "permissions violation" in str(exc).lower():
                denied.append(str(exc))
                done.set()

        nc = await connect_once(_ops_nats_url(), error_cb=on_error)
        seen = 0
        subscriptions = []

        async def on_message(msg: "Msg") -> None:
            nonlocal seen
            if count and seen >= count:
                return  # already in flight when the count was reached: not printed
            typer.echo(json.dumps(_tail_line(msg)))
            seen += 1
            if count and seen >= count:
                done.set()

        for pattern in subject or OBSERVED_SUBJECTS:
            subscriptions.append(await nc.subscribe(pattern, cb=on_message))
        await done.wait()
        for subscription in subscriptions:
            await subscription.unsubscribe()
        await nc.close()

    _ops_run(tail())
    if denied:
        typer.echo(f"{denied[0]} (this user may not read it)", err=True)
        raise typer.Exit(1)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO 8601 time (without an offset: local time), or a duration back
    from now: `90s`, `30m`, `2h`, `7d`."""
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now - timedelta(**{unit: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"--since {text!r}: an ISO 8601 time or a duration such as 2h, 30m, 7d") from None
    return moment if moment.tzinfo is not None else moment.astimezone()


@events_app.command("replay")
def events_replay(
    consumer: Annotated[
        str, typer.Option("--consumer", help="the durable to re-drive, e.g. scheduling-IOP_INTAKE", show_default=False)
    ],
    since: Annotated[
        str | None, typer.Option("--since", help="from the first event stored at or after this time (ISO 8601, 2h, 7d)")
    ] = None,
    from_seq: Annotated[int | None, typer.Option("--from-seq", help="from this stream sequence", min=1)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what it would do; change nothing")] = False,
    timeout: Annotated[float, typer.Option(help="give up following the progress after this many seconds")] = 3600.0,
) -> None:
    """Re-drive a durable consumer from a point in its stream. The stream is not
    rewritten and nothing is re-published: the service that owns the durable resets it
    and consumes again, and its inbox skips what it already applied (so clearing a
    projection and re-driving from the start rebuilds it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from iopnet.replay import ReplayFailed, redrive, redrive_instructions, service_of
    from shared.messaging.control import ControlReply, RedriveRequest

    if (since is None) == (from_seq is None):
        raise typer.BadParameter("give exactly one of --since and --from-seq")
    start_time = parse_since(since) if since is not None else None
    if service_of(consumer) is None:
        typer.echo(redrive_instructions(consumer, from_seq=from_seq, since=start_time), err=True)
        raise typer.Exit(2)
    request = RedriveRequest(durable=consumer, from_seq=from_seq, since=start_time, dry_run=dry_run)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = None

    def progress(state: ControlReply) -> None:
        nonlocal task
        if dry_run:
            return
        if task is None:
            bar.start()
            task = bar.add_task(f"re-driving {consumer}", total=state.covered or 0, note="")
            return
        remaining = (state.num_pending or 0) + (state.num_ack_pending or 0)
        total = max(bar.tasks[0].total or 0, remaining)
        bar.update(task, total=total, completed=total - remaining, note=f"{remaining} to go")

    try:
        answer, final = _ops_run(redrive(_ops_nats_url(), request, progress=progress, timeout=timeout))
    except ReplayFailed as exc:
        bar.stop()
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    bar.stop()
    start = f"sequence {answer.start_seq}"
    if answer.requested_seq is not None:
        start += f" (not {answer.requested_seq}: the durable has not acknowledged the events before it yet)"
    if dry_run:
        typer.echo(
            f"dry run: would reset {answer.durable} on {answer.stream} (filter {', '.join(answer.filter_subjects)}) "
            f"to {start}, re-driving {answer.covered} of the messages stored up to {answer.last_seq}; "
            f"{answer.service} would apply the ones its inbox does not hold. Nothing was changed.",
        )
        return
    summary = {
        "durable": answer.durable,
        "stream": answer.stream,
        "start_seq": answer.start_seq,
        "redriven": answer.covered,
        "applied": final.applied - answer.applied,
        "duplicates": final.duplicates - answer.duplicates,
        "dead_lettered": final.dead_lettered - answer.dead_lettered,
    }
    typer.echo(json.dumps(summary))


@events_app.command("reapply")
def events_reapply(
    stream: Annotated[str, typer.Argument(help="IOP_INTAKE | IOP_SCHEDULING | IOP_NOTIFICATIONS | IOP_RESTRICTED")],
    sequence: Annotated[int, typer.Argument(help="the event's sequence in STREAM")],
    service: Annotated[str, typer.Option("--service", help="the consuming service that applies it again")],
    reason: Annotated[str, typer.Option("--reason", help="why (3-200 characters, one line; kept in its audit row)")],
    by: Annotated[str | None, typer.Option("--by", help="who asks (default: your login name)")] = None,
) -> None:
    """Have SERVICE apply one stored event again although its inbox holds it (a repair),
    recorded in its operations table. Its handlers converge: only what is missing changes."""
    import getpass

    from pydantic import ValidationError

    from iopnet.replay import ReplayFailed, reapply_event
    from shared.messaging.control import ReapplyRequest

    try:
        request = ReapplyRequest(stream=stream, sequence=sequence, reason=reason, requested_by=by or getpass.getuser())
    except ValidationError as exc:
        fields = ", ".join(sorted({str(error["loc"][0]) for error in exc.errors()}))
        raise typer.BadParameter(f"invalid {fields}") from None
    try:
        reply = asyncio.run(reapply_event(_ops_nats_url(), service, request))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ReplayFailed as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{reply.service}: {reply.outcome} {reply.event_type} {reply.event_id} (operation {reply.operation_id})")


def _ops_run(work: "Coroutine[Any, Any, T]") -> T:
    """Run one of the operator's commands; a broker that cannot be reached is said in
    one line (and exit status 1), not a traceback."""
    import logging

    import nats.errors

    from iopnet.natsd import public_url

    # nats-py logs each failed connection attempt with a traceback; the one line below says it.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(work)
    except (nats.errors.NoServersError, ConnectionRefusedError) as exc:
        where = public_url(_ops_nats_url())
        typer.echo(f"cannot reach NATS at {where}: {type(exc).__name__} (is it running?)", err=True)
    except TimeoutError:  # nats-py's and asyncio's
        typer.echo(f"NATS at {public_url(_ops_nats_url())} did not answer in time", err=True)
    raise typer.Exit(1)


def _bar(description: str) -> "Progress":
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True), transient=True
    )


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(help="at most this many")] = 50) -> None:
    """List dead letters with their reason (newest last)."""
    from iopnet.dlq import list_dead_letters

    with _bar("reading dead letters") as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        letters = _ops_run(list_dead_letters(_ops_nats_url(), limit, progress=progress))
    for letter in letters:
        typer.echo(json.dumps(letter))


@dlq_app.command("show")
def dlq_show(sequence: Annotated[int, typer.Argument(help="the dead letter's sequence in IOP_DLQ")]) -> None:
    """Show one dead letter: its reason and headers, and the envelope (a restricted one's
    payload is withheld: the original stays in IOP_RESTRICTED)."""
    from iopnet.dlq import DeadLetterError, show_dead_letter

    try:
        letter = _ops_run(show_dead_letter(_ops_nats_url(), sequence))
    except DeadLetterError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(letter, indent=2))


@dlq_app.command("retry")
def dlq_retry(sequence: Annotated[int, typer.Argument(help="the dead letter's sequence in IOP_DLQ")]) -> None:
    """Have the service that dead-lettered it apply the stored original again (once: its inbox skips a repeat)."""
    from iopnet.dlq import RetryRefused, retry_dead_letter

    try:
        reply = _ops_run(retry_dead_letter(_ops_nats_url(), sequence))
    except RetryRefused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{reply.service}: {reply.outcome}")


@dlq_app.command("purge")
def dlq_purge(
    sequences: Annotated[list[int] | None, typer.Argument(help="dead letters' sequences in IOP_DLQ")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
    service: Annotated[str | None, typer.Option(help="every dead letter of this service")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Remove dead letters that have been dealt with. The original events stay in their
    streams; only the record of the failure goes."""
    from iopnet.dlq import DeadLetterError, purge_dead_letters

    if sum(map(bool, (sequences, all_, service))) != 1:
        raise typer.BadParameter("give dead letters' sequences, or --service S, or --all")
    what = (
        f"dead letter(s) {', '.join(map(str, sequences))}"
        if sequences
        else f"every dead letter of {service}"
        if service
        else "every dead letter"
    )
    if not yes and not typer.confirm(f"remove {what} from IOP_DLQ?"):
        raise typer.Exit(1)
    try:
        with _bar("removing dead letters") as bar:
            task = bar.add_task("", total=len(sequences) if sequences else None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            purge = purge_dead_letters(_ops_nats_url(), sequences=sequences, service=service, progress=progress)
            removed = _ops_run(purge)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except DeadLetterError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"removed {removed} dead letter(s)")


def main() -> None:
    """The `iopnet` command: a setting the services refuse (IOPNET_*) is reported as
    such, in one line, rather than as a traceback."""
    try:
        app()
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        typer.echo(f"iopnet: invalid settings: {'; '.join(map(_setting_problem, exc.errors()))}", err=True)
        raise SystemExit(2) from None


def _setting_problem(error: "ErrorDetails") -> str:
    message = error["msg"].removeprefix("Value error, ")
    field = "_".join(map(str, error["loc"]))
    return f"IOPNET_{field.upper()}: {message}" if field else message


if __name__ == "__main__":
    main()
