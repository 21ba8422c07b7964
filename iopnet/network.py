"""The whole network as local processes: an embedded nats-server (unless a NATS URL is
given) and `iopnet serve` for each service. Used by `iopnet run`, `iopnet bench` and the
end-to-end tests, so all three start the network the same way.

Scaled out (tests/faults/test_cluster.py): `nats_nodes=3` runs an embedded three-node
cluster instead of the one server (the services get every node's URL and fail over), and
`replicas=N` runs N processes of each service (`replicas={"intake": 2}` of the services
named), each on a port of its own, sharing the service's database, durable consumers and
outbox (PostgreSQL only: SQLite takes one).
Replica 1 of a service is named as the service (`intake`), the others `intake-2` and on.
`safety_lane_process=True` (PostgreSQL) runs notifications' safety lane in a process of
its own, `notifications-safety` (`IOPNET_LANES=safety`), and every other lane in the
others (`IOPNET_LANES=routine`).

`console=True` (`iopnet run`) also runs the web console (`iopnet serve console`) on
`console_port`, as NATS user `console`, with the development sign-in on: a local network
has no identity provider. Its session key is derived from the network's JWT secret."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Literal

import httpx

from iopnet.natsd import (
    CONSOLE_USER,
    OBSERVED_SUBJECTS,
    RESTRICTED_USERS,
    NatsCluster,
    NatsServer,
    embedded_data_dir,
    free_port,
    load_or_create_credentials,
    public_url,
)
from shared.settings import SERVICES, ServiceName, Settings

# `supervise`: a service that exits unexpectedly is started again after these pauses, one
# more step for each exit in a row (a service that cannot start does not spin), and back
# to the first once it has run for STABLE_SECONDS.
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_SECONDS = 60.0
# What LocalNetwork runs: the three services and, with console=True, the console.
CONSOLE: Literal["console"] = "console"
SAFETY_LANE_INSTANCE = "notifications-safety"
# The niceness of a process that does routine work only (IOPNET_CPU_NICE, shared/settings.py):
# on the one host, safety work and the requests people wait for get the cores first.
ROUTINE_NICENESS = 10
Deployable = ServiceName | Literal["console"]
# The console owns no data and reads no contact detail: none of the services' database
# URLs, restricted NATS account, mail or SMS credentials reach it.
_NOT_FOR_THE_CONSOLE = (
    "IOPNET_NATS_RESTRICTED_URL",
    "IOPNET_NATS_RESTRICTED_PASSWORD_FILE",
    *(f"IOPNET_{n.upper()}_DATABASE_{suffix}" for n in SERVICES for suffix in ("URL", "PASSWORD_FILE")),
    "IOPNET_SMTP_PASSWORD",
    "IOPNET_SMTP_PASSWORD_FILE",
    "IOPNET_SMS_API_KEY",
    "IOPNET_SMS_API_KEY_FILE",
)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _without_password(url: str) -> str:
    """`scheme://user:password@host` as `scheme://user@host` (a password file completes it)."""
    return re.sub(r"^([a-z+]+://[^:@/]+):[^@/]*@", r"\1@", url)


MAX_REPLICAS = 8


def service_replicas(text: str) -> dict[ServiceName, int]:
    """Processes per service from a command line: `N` for every service, or
    `intake=2,notifications=3` (a service not named runs one). ValueError says what is wrong."""
    text = text.strip()
    if text.isdigit():
        return _bounded(dict.fromkeys(SERVICES, int(text)))
    counts: dict[ServiceName, int] = {}
    for part in text.split(","):
        name, separator, count = part.strip().partition("=")
        if not separator or not count.strip().isdigit():
            raise ValueError(f"{part.strip()!r}: write N, or service=N[,service=N] (e.g. intake=2)")
        service = next((s for s in SERVICES if s == name.strip()), None)
        if service is None:
            raise ValueError(f"{name.strip()!r} is not a service: {', '.join(SERVICES)}")
        counts[service] = int(count)
    return _bounded(counts)


def _bounded(counts: dict[ServiceName, int]) -> dict[ServiceName, int]:
    if any(not 1 <= count <= MAX_REPLICAS for count in counts.values()):
        raise ValueError(f"from 1 to {MAX_REPLICAS} processes per service")
    return counts


class LocalNetwork:
    def __init__(
        self,
        settings: Settings,
        log_dir: Path | None = None,
        *,
        bench_password: str | None = None,
        nats_nodes: int = 1,
        replicas: int | Mapping[ServiceName, int] = 1,
        console: bool = False,
        safety_lane_process: bool = False,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        # `iopnet bench`: the embedded server gets an account for the raw baseline.
        self.bench_password = bench_password
        counts = {n: replicas if isinstance(replicas, int) else replicas.get(n, 1) for n in SERVICES}
        if any(count < 1 for count in counts.values()):
            raise ValueError("every service runs at least one process")
        if any(counts[n] > 1 and settings.database_url(n).startswith("sqlite") for n in SERVICES):
            raise ValueError("several replicas of a service need PostgreSQL: SQLite takes one process")
        if safety_lane_process and settings.database_url("notifications").startswith("sqlite"):
            raise ValueError("the safety lane in a process of its own needs PostgreSQL: SQLite takes one process")
        self.nats_nodes = nats_nodes
        self.nats: NatsServer | None = None
        # nats_nodes > 1: the embedded cluster (self.nats stays None).
        self.nats_cluster: NatsCluster | None = None
        # Instance name -> (service, HTTP port): replica 1 has the service's own name and port.
        self.instances: dict[str, tuple[Deployable, int]] = {}
        for name in SERVICES:
            for replica in range(1, counts[name] + 1):
                instance = name if replica == 1 else f"{name}-{replica}"
                self.instances[instance] = (name, settings.port(name) if replica == 1 else free_port())
        # Instance -> IOPNET_LANES, for the processes that read a part of their service's lanes.
        self.lanes: dict[str, str] = {}
        if safety_lane_process:
            self.instances[SAFETY_LANE_INSTANCE] = ("notifications", free_port())
            self.lanes = {i: "routine" for i in self.replicas("notifications")} | {SAFETY_LANE_INSTANCE: "safety"}
        if console:
            self.instances[CONSOLE] = (CONSOLE, settings.console_port)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        # supervise(): exits in a row, when each was started, when a pending restart is due,
        # and which restarted ones have not answered /readyz yet.
        self.restarts: dict[str, int] = {}
        self._started_at: dict[str, float] = {}
        self._restart_at: dict[str, float] = {}
        self._awaiting_ready: set[str] = set()

    @property
    def embedded(self) -> NatsServer | NatsCluster | None:
        """The nats-server (or cluster) this network started, if any."""
        return self.nats_cluster if self.nats_cluster is not None else self.nats

    def user_url(self, user: str) -> str:
        """`user` on the embedded server or on every node of the embedded cluster."""
        embedded = self.embedded
        if embedded is None:
            raise RuntimeError("no embedded nats-server: IOPNET_NATS_URL names an external one")
        return embedded.user_url(user)

    @property
    def nats_url(self) -> str:
        """For observers (the CLI, tests, bench): on the embedded server, the `ops` user,
        which sees every public subject but nothing on `iop.restricted.>`."""
        return self.user_url("ops") if self.embedded is not None else self.settings.effective_nats_url

    @property
    def observed_subjects(self) -> tuple[str, ...]:
        """What `nats_url` may subscribe to (for a BusRecorder)."""
        return OBSERVED_SUBJECTS if self.embedded is not None else ("iop.>",)

    @property
    def public_nats_url(self) -> str:
        """`nats_url` without credentials, for printing."""
        return public_url(self.nats_url)

    def service_nats_url(self, service: Deployable) -> str:
        """Each service (and the console) connects to the embedded server (every node of
        the embedded cluster) as its own user."""
        if self.embedded is None:
            return self.settings.effective_nats_url
        return self.user_url(CONSOLE_USER if service == CONSOLE else service)

    def url(self, instance: str) -> str:
        """An instance's base URL: `intake` is replica 1 of intake, `intake-2` replica 2."""
        _, port = self.instances[instance]
        return f"http://{self.settings.http_host}:{port}"

    def replicas(self, service: ServiceName) -> list[str]:
        """The instance names of `service`, replica 1 first."""
        return [instance for instance, (name, _) in self.instances.items() if name == service]

    def routine_only(self, instance: str) -> bool:
        """Whether the instance does routine work only: scheduling (bookings, waitlists,
        attendance), and notifications' process without the safety lane when it has one."""
        service, _ = self.instances[instance]
        return service == "scheduling" or self.lanes.get(instance) == "routine"

    def instance_env(self, instance: str) -> dict[str, str]:
        """The environment of one instance's process: its service's, its lanes, and a lower
        CPU priority if it does routine work only."""
        service, port = self.instances[instance]
        env = self.child_env(service, port)
        if instance in self.lanes:
            env["IOPNET_LANES"] = self.lanes[instance]
        if self.routine_only(instance):
            env.setdefault("IOPNET_CPU_NICE", str(ROUTINE_NICENESS))  # a value of the caller's wins
        return env

    def child_env(self, service: Deployable, port: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "IOPNET_NATS_URL": self.service_nats_url(service),
                "IOPNET_DATA_DIR": str(self.settings.data_dir),
                "IOPNET_HTTP_HOST": self.settings.http_host,
                "IOPNET_LOG_LEVEL": self.settings.log_level,
                **{f"IOPNET_{n.upper()}_DATABASE_URL": self.settings.database_url(n) for n in SERVICES},
                **{f"IOPNET_{name.upper()}_PORT": str(self.settings.port(name)) for name in SERVICES},
            }
        )
        if port is not None:
            env[f"IOPNET_{service.upper()}_PORT"] = str(port)
        if self.nats_cluster is not None:
            env["IOPNET_STREAM_REPLICAS"] = str(min(3, self.nats_nodes))
        if self.embedded is not None and service in RESTRICTED_USERS:
            # Contact details live in a NATS account of their own (iopnet/natsd.py).
            env["IOPNET_NATS_RESTRICTED_URL"] = self.user_url(RESTRICTED_USERS[service])
        elif self.settings.nats_restricted_url:
            env["IOPNET_NATS_RESTRICTED_URL"] = self.settings.nats_restricted_url
        self._pass_secrets(env)
        if service == CONSOLE:
            env["IOPNET_CONSOLE_PORT"] = str(port if port is not None else self.settings.console_port)
            env.update({f"IOPNET_{name.upper()}_URL": self.url(name) for name in SERVICES})
            # No identity provider here: the demo users' sign-in (an explicit value wins).
            env.setdefault("IOPNET_CONSOLE_DEV_SIGNIN", "true")
            for variable in _NOT_FOR_THE_CONSOLE:
                env.pop(variable, None)
        return env

    def _pass_secrets(self, env: dict[str, str]) -> None:
        """A secret that came from a file (IOPNET_*_FILE) reaches the children as that
        file, never as its value in their environment; the other form is removed, as a
        child refuses a secret given both ways."""
        settings = self.settings
        env.pop("IOPNET_JWT_SECRET", None)
        env.pop("IOPNET_JWT_SECRET_FILE", None)
        if settings.jwt_secret_file is not None:
            env["IOPNET_JWT_SECRET_FILE"] = str(settings.jwt_secret_file)
        elif settings.jwt_secret:
            env["IOPNET_JWT_SECRET"] = settings.jwt_secret
        urls = {
            "nats": "IOPNET_NATS_URL",
            "nats_restricted": "IOPNET_NATS_RESTRICTED_URL",
            **{f"{n}_database": f"IOPNET_{n.upper()}_DATABASE_URL" for n in SERVICES},
        }
        for field, variable in urls.items():
            file_variable = f"IOPNET_{field.upper()}_PASSWORD_FILE"
            path = getattr(settings, f"{field}_password_file")
            env.pop(file_variable, None)
            if path is not None and variable in env and self.embedded is None:
                env[variable] = _without_password(env[variable])
                env[file_variable] = str(path)

    def start(self, timeout: float = 60) -> "LocalNetwork":
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        _ = self.settings.signing_secret  # created once here, before the services race for it
        if self.settings.nats_url is None:
            embedded = embedded_data_dir(self.settings.data_dir)
            users = load_or_create_credentials(embedded)
            if self.nats_nodes > 1:
                self.nats_cluster = NatsCluster(
                    embedded, self.nats_nodes, self.settings.embedded_nats_host, users, self.bench_password
                )
                self.nats_cluster.start()
            else:
                self.nats = NatsServer(
                    embedded,
                    self.settings.embedded_nats_host,
                    self.settings.embedded_nats_port,
                    users=users,
                    bench_password=self.bench_password,
                )
                self.nats.start()
        # Replica 1 first: it migrates the database; the others start on the migrated one
        # (two Alembic upgrades at once on a fresh database would race). The console, which
        # has no database, starts with them.
        first: list[str] = [instance for instance in self.instances if instance in (*SERVICES, CONSOLE)]
        for instance in first:
            self._spawn(instance)
        self.wait_ready(timeout, first)
        for instance in self.instances:
            if instance not in first:
                self._spawn(instance)
        self.wait_ready(timeout)
        return self

    def _spawn(self, instance: str) -> None:
        service, _ = self.instances[instance]
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            output = open(self.log_dir / f"{instance}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(output)
        # A session of its own, as a container is a cgroup of its own: on a kernel with
        # autogroups (Linux's default), the cores are shared between sessions first, and a
        # niceness ranks a process only within its own session. In the launcher's session
        # intake, the safety lane, the load generator and nats-server shared one session's
        # share against each PostgreSQL backend (each in a session of its own), and a
        # routine process's niceness only put it behind them (docs/performance.md).
        self.processes[instance] = subprocess.Popen(
            [sys.executable, "-m", "iopnet.cli", "serve", service],
            env=self.instance_env(instance),
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
        self._started_at[instance] = time.monotonic()

    # --- supervision (`iopnet run`) --------------------------------------------------------------

    def supervise(self, log: Callable[[str], None], now: float | None = None) -> None:
        """One supervisor tick: a service that exited unexpectedly is started again after
        a backoff (RESTART_BACKOFF_SECONDS), with a line to `log` for the exit, the restart
        and its readiness. Never blocks longer than one /readyz probe per restarted service."""
        now = time.monotonic() if now is None else now
        for name, process in list(self.processes.items()):
            code = process.poll()
            if code is None:
                if self.restarts.get(name) and now - self._started_at.get(name, now) >= STABLE_SECONDS:
                    self.restarts[name] = 0  # it has been up a while: the next exit waits 1 s again
                continue
            if name not in self._restart_at:
                attempt = self.restarts.get(name, 0)
                delay = RESTART_BACKOFF_SECONDS[min(attempt, len(RESTART_BACKOFF_SECONDS) - 1)]
                self._restart_at[name] = now + delay
                self._awaiting_ready.discard(name)
                log(f"{name} exited unexpectedly ({describe_exit(code)}); restarting in {delay:g}s")
            elif now >= self._restart_at[name]:
                del self._restart_at[name]
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._spawn(name)
                self._awaiting_ready.add(name)
                log(f"{name} restarted (pid {self.processes[name].pid}, restart {self.restarts[name]} in a row)")
        if self._awaiting_ready:
            with httpx.Client(timeout=0.5) as client:
                for name in sorted(self._awaiting_ready):
                    if self.processes[name].poll() is None and self._answers_ready(client, name):
                        self._awaiting_ready.discard(name)
                        log(f"{name} is ready again")

    # --- faults: one process at a time, same ports, same data dir (tests/faults) ---------------

    def signal_service(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Send `sig` (kill -9 by default, or SIGTERM for a graceful stop) to one service
        and wait for it to exit; returns its exit status."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # a graceful stop that hangs is itself a fault: end it
            process.wait()
            raise RuntimeError(f"{name} did not exit within {timeout}s of signal {sig}") from None

    def restart_service(self, name: str, timeout: float = 60) -> None:
        """Start a stopped service again, as `start` did, and wait until it is ready."""
        if self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name)
        self.wait_ready(timeout, [name])

    def stop_nats(self, kill: bool = True, node: int | None = None) -> None:
        """kill -9 (or SIGTERM) the embedded nats-server, or node `node` (0-based) of the
        embedded cluster; its data dir and ports are kept."""
        if self.nats_cluster is not None:
            if node is None:
                self.nats_cluster.stop(kill=kill)
            else:
                self.nats_cluster.stop_node(node, kill=kill)
            return
        if self.nats is None:
            raise RuntimeError("no embedded nats-server: IOPNET_NATS_URL names an external one")
        self.nats.stop(kill=kill)

    def start_nats(self, node: int | None = None) -> None:
        """Start the embedded nats-server (or a cluster's node, or every stopped node)
        again on the same ports, data dir and users."""
        if self.nats_cluster is not None:
            if node is None:
                self.nats_cluster.start()
            else:
                self.nats_cluster.start_node(node)
            return
        if self.nats is None:
            raise RuntimeError("no embedded nats-server: IOPNET_NATS_URL names an external one")
        self.nats.start()

    def wait_ready(self, timeout: float, names: Iterable[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.processes if names is None else names)
        with httpx.Client(timeout=1) as client:
            while pending:
                for name in sorted(pending):
                    if self.processes[name].poll() is not None:
                        raise RuntimeError(f"{name} exited during start ({self.processes[name].returncode})")
                    if self._answers_ready(client, name):
                        pending.discard(name)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {timeout}s: {', '.join(sorted(pending))}")
                if pending:
                    time.sleep(0.1)  # readiness poll of child processes

    def _answers_ready(self, client: httpx.Client, name: str) -> bool:
        """Ready, and it is `name` that answers: another process on its port (one that took
        the port first) must not pass for it."""
        try:
            answer = client.get(f"{self.url(name)}/readyz")
            return answer.status_code == 200 and answer.json().get("service") == self.instances[name][0]
        except (httpx.HTTPError, ValueError):
            return False

    def died(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self) -> dict[str, int]:
        """SIGTERM every service (graceful: in-flight work finishes), then the broker."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        if self.nats is not None:
            self.nats.stop()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
        for log in self._logs:
            log.close()
        return codes
