"""Settings from the environment (prefix IOPNET_), with the local defaults of DESIGN A2."""

import contextlib
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.db import DEFAULT_POOL_SIZE

ServiceName = Literal["intake", "scheduling", "notifications"]
SERVICES: tuple[ServiceName, ...] = ("intake", "scheduling", "notifications")
DEFAULT_PORTS: dict[str, int] = {"intake": 8001, "scheduling": 8002, "notifications": 8003}
# HS256 with a shorter key can be brute-forced offline from any one token (RFC 7518
# section 3.2 asks for at least the hash size, 256 bits).
MIN_SECRET_BYTES = 32


class WeakSecretError(ValueError):
    """The JWT signing secret is too short to start with."""


class SecretFileError(ValueError):
    """An IOPNET_*_FILE secret cannot be used (unreadable, empty, or given twice)."""


def check_secret(secret: str, origin: str) -> str:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise WeakSecretError(
            f"the JWT signing secret ({origin}) has {len(secret.encode())} bytes; at least {MIN_SECRET_BYTES} "
            "are needed: set a longer IOPNET_JWT_SECRET, or unset it to use a generated one"
        )
    return secret


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (a short secret, a password) is not echoed.
    model_config = SettingsConfigDict(env_prefix="IOPNET_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Path(".data")
    # Given: use it and start nothing. Absent: the embedded server below.
    nats_url: str | None = None
    # The account that holds IOP_RESTRICTED (contact details), for intake and notifications
    # only. Unset: the same server as nats_url (a server without accounts, as in tests).
    nats_restricted_url: str | None = None
    embedded_nats_host: str = "127.0.0.1"
    embedded_nats_port: int = 4223

    http_host: str = "127.0.0.1"
    intake_port: int = DEFAULT_PORTS["intake"]
    scheduling_port: int = DEFAULT_PORTS["scheduling"]
    notifications_port: int = DEFAULT_PORTS["notifications"]
    # Where the console and the CLI reach each service (IOPNET_<SERVICE>_URL, e.g.
    # http://intake:8001 on a compose network). Unset: http://<http_host>:<port>, the
    # local network's; set it wherever http_host is a bind address such as 0.0.0.0.
    intake_url: str | None = None
    scheduling_url: str | None = None
    notifications_url: str | None = None

    # postgresql+asyncpg://… or sqlite+aiosqlite:///…; the plain postgresql://, postgres://
    # and sqlite:/// forms (what most tools print) are read as those.
    intake_database_url: str | None = None
    scheduling_database_url: str | None = None
    notifications_database_url: str | None = None

    # Absent: a random secret kept in <data_dir>/jwt.secret, shared by the local network.
    jwt_secret: str | None = None
    jwt_ttl_seconds: int = 8 * 3600
    jwt_issuer: str = "iopnet"
    jwt_audience: str = "iopnet"
    # A token whose exp - iat exceeds this is refused, whoever signed it.
    jwt_max_ttl_seconds: int = 12 * 3600

    # Staff and patients sign in through an OpenID Connect provider (issue 13; off when
    # no issuer is set). The services accept its tokens (RS256/ES256 from its JWKS) for
    # this audience, mapping these claims to iopnet's role, sites and patient id; tokens
    # of the shared secret above keep working (make run, the tests, `iopnet token`).
    oidc_issuer: str | None = None
    oidc_audience: str = "iopnet-console"
    oidc_role_claim: str = "iopnet_role"
    oidc_sites_claim: str = "iopnet_sites"
    oidc_patient_claim: str = "iopnet_patient_id"
    # The console signs people in as this client (Authorization Code with PKCE; the
    # secret only if the provider holds the console as a confidential client).
    oidc_client_id: str = "iopnet-console"
    oidc_client_secret: str | None = None

    # The console (services/console): the clinics' screens; it owns no patient data.
    console_port: int = 8000
    # Where browsers reach it (the sign-in's redirect URI); default http://<host>:<port>.
    console_public_url: str | None = None
    # Signs the session cookie. Absent: derived from the JWT secret (one secret for
    # `make run`); a deployment sets its own (IOPNET_CONSOLE_SESSION_SECRET_FILE), at
    # least MIN_SECRET_BYTES long: a cookie would let a short one be guessed offline.
    console_session_secret: str | None = None
    console_idle_minutes: int = Field(default=15, ge=1, le=12 * 60)
    # The development sign-in (pick a demo user, get a shared-secret token): `iopnet run`
    # turns it on; never in production (the production compose and manifests do not).
    console_dev_signin: bool = False

    log_level: str = "INFO"
    max_body_bytes: int = 64 * 1024

    # Consumers (DESIGN B3/B7): bounded redelivery, then the dead-letter stream.
    max_deliver: int = 5
    # Short, because a live consumer renews its leases (in_progress every ack_wait/3) and a
    # crashed one's messages must come back soon: a restart waits for them, for order.
    ack_wait_seconds: float = 10.0
    nak_delay_seconds: float = 1.0
    fetch_batch: int = 64
    # Connections a service process keeps to its PostgreSQL database, at most (SQLite: one).
    # All of them stay open once opened; size them against the server's max_connections
    # (processes x this, plus headroom for migrations and tools).
    db_pool_size: int = Field(default=DEFAULT_POOL_SIZE, ge=1, le=200)
    # How long a routine consumer's batch runs in one transaction before it commits and goes
    # on in a new one (shared/messaging/consumer.py). Unset: ROUTINE_TRANSACTION_SECONDS
    # for the service's database (shared/runtime.py).
    routine_transaction_seconds: float | None = Field(default=None, gt=0, le=30)
    # Which of the service's consumer lanes this process reads. "all" by default; on
    # PostgreSQL, notifications' safety lane (check-ins, the care-team alerts) may get a
    # process of its own ("safety") beside the others ("routine"): it then never waits
    # for a turn of an event loop busy with a wave of bookings and reminders (issue 10:
    # an urgent check-in's alert, p99 284-328 ms on PostgreSQL under the benchmark's
    # load in one process, 152-228 ms with the lane in its own; docs/performance.md).
    lanes: Literal["all", "safety", "routine"] = "all"
    # The least Unix niceness this process runs at (0-19): one that does routine work only
    # gives the CPU to those carrying safety work (intake's check-ins, the safety lane)
    # whenever the host's cores are all busy, instead of sharing it evenly with them. The
    # local network (`iopnet run`, `iopnet bench`) starts scheduling and notifications'
    # routine-lane process at ROUTINE_NICENESS (iopnet/network.py); in containers, where
    # each process has a CPU group of its own, CPU weights do the same (docker-compose.yml,
    # deploy/k8s). Issue 10: urgent alert p99 on PostgreSQL 202-512 ms before, 107-220 after.
    cpu_nice: int = Field(default=0, ge=0, le=19)
    # Streams: how long JetStream drops a re-published event_id.
    duplicate_window_seconds: float = 120.0
    # Streams on a cluster (docs/operations.md, Durability settings): each stream is kept on
    # this many nodes. 1 for a single server (the embedded one); 3 on a three-node cluster,
    # set alike on every service (each may create a stream it needs). An existing stream
    # is brought to it by its owner's next start.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Retention (JetStream limits, the oldest discarded first): the event streams keep 90
    # days and 1 GiB each, what a replay (`events replay --since`), a webhook's backfill
    # or a database restored from a backup can reach back to. Dead letters wait longer
    # for an operator; the integrations' feeds are read within days. max_bytes is
    # reserved on each node's JetStream store: 4 event streams + DLQ + FEED by default
    # 5.25 GiB per node, within a store of 8 GiB (deploy/k8s).
    stream_max_age_days: float = Field(default=90.0, gt=0)
    stream_max_bytes: int = Field(default=1024**3, gt=0)
    dlq_max_age_days: float = Field(default=180.0, gt=0)
    dlq_max_bytes: int = Field(default=256 * 1024**2, gt=0)
    feed_max_age_days: float = Field(default=30.0, gt=0)
    feed_max_bytes: int = Field(default=1024**3, gt=0)
    outbox_batch: int = 256
    # A consumer read only for outside systems (intake's feed lane, notifications'
    # webhook-only types) follows who asks at once in the process that was asked; the
    # others (replicas) see the change within this long.
    interest_refresh_seconds: float = Field(default=30.0, gt=0)
    # The relay is woken on commit; this is only its retry tick after a failed publish.
    outbox_retry_seconds: float = 2.0

    # Scheduling's background loops: treatment-hours review and the session horizon.
    hours_review_interval_seconds: float = 900.0
    horizon_interval_seconds: float = 3600.0

    # Intake's accounting of disclosures to outside systems (42 CFR 2.24): kept this long
    # (6 years by default), then purged by a daily job.
    disclosure_retention_days: int = Field(default=6 * 366, ge=1)
    disclosure_purge_interval_seconds: float = 86400.0

    # Notifications (services/notifications). Live channels off: every message goes to
    # the console channel (ids only). On: email over SMTP, SMS through the provider's
    # HTTP API, webhooks; the consent gate and quiet hours then apply.
    notify_live_channels: bool = False
    notify_reminder_offsets_minutes: list[int] = [24 * 60, 120]
    notify_quiet_start: str = "21:00"  # site-local; per-site override via the API
    notify_quiet_end: str = "08:00"
    notify_business_start: str = "09:00"  # non-urgent care-team messages wait for these
    notify_business_end: str = "17:00"
    notify_business_days: list[int] = [1, 2, 3, 4, 5]  # ISO weekdays
    notify_escalation_minutes: float = 10.0  # unacknowledged urgent alert -> next on the roster
    notify_escalation_check_seconds: float = 15.0
    notify_max_attempts: int = 5
    notify_retry_base_seconds: float = 2.0
    notify_retry_max_seconds: float = 600.0
    notify_send_timeout_seconds: float = 10.0
    notify_dispatch_tick_seconds: float = 1.0
    notify_care_team_language: str = "en"
    # Development only: webhooks over plain http and to loopback/private addresses
    # (a local receiver). Off: https to public addresses only (no SSRF).
    notify_allow_insecure_targets: bool = False
    notify_response_max_bytes: int = 64 * 1024
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_from: str = "iopnet <no-reply@iopnet.invalid>"
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    smtp_username: str | None = None
    smtp_password: str | None = None
    sms_api_url: str | None = None
    sms_api_key: str | None = None
    sms_sender: str | None = None

    # Secrets from files (compose `secrets:`, Kubernetes Secret volumes): IOPNET_<NAME>_FILE
    # names a file whose content (without its final newline) is the secret, so it is
    # never in the environment (`docker inspect`) or in a URL given in one. A password
    # file completes a URL that names the user only (`nats://intake@nats:4222`,
    # `postgresql+asyncpg://intake@postgres:5432/intake`). Giving a secret both ways is refused.
    jwt_secret_file: Path | None = None
    nats_password_file: Path | None = None
    nats_restricted_password_file: Path | None = None
    intake_database_password_file: Path | None = None
    scheduling_database_password_file: Path | None = None
    notifications_database_password_file: Path | None = None
    smtp_password_file: Path | None = None
    sms_api_key_file: Path | None = None
    oidc_client_secret_file: Path | None = None
    console_session_secret_file: Path | None = None

    @field_validator("intake_database_url", "scheduling_database_url", "notifications_database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        # Refused when settings are read, not at the first connection: SQLAlchemy would
        # otherwise reach for a synchronous driver that is not installed (psycopg2).
        return async_database_url(value) if value else None

    @field_validator("jwt_secret")
    @classmethod
    def _secret_long_enough(cls, value: str | None) -> str | None:
        # Refused here, when settings are read, so a service never starts with it.
        # Empty means unset (the generated secret), as the signing_secret property reads it.
        return check_secret(value, "IOPNET_JWT_SECRET") if value else None

    @model_validator(mode="after")
    def _secrets_from_files(self) -> "Settings":
        if self.jwt_secret_file is not None:
            _not_both(self.jwt_secret, "IOPNET_JWT_SECRET")
            self.jwt_secret = check_secret(_read_secret(self.jwt_secret_file), "IOPNET_JWT_SECRET_FILE")
        for field in ("smtp_password", "sms_api_key", "oidc_client_secret", "console_session_secret"):
            path = getattr(self, f"{field}_file")
            if path is not None:
                _not_both(getattr(self, field), f"IOPNET_{field.upper()}")
                setattr(self, field, _read_secret(path))
        for field, encode in (
            ("nats_url", _nats_userinfo),
            ("nats_restricted_url", _nats_userinfo),
            *((f"{service}_database_url", _percent_encoded) for service in SERVICES),
        ):
            path = getattr(self, field.replace("_url", "_password_file"))
            if path is not None:
                url = getattr(self, field)
                if not url:
                    raise SecretFileError(
                        f"IOPNET_{field.replace('_url', '_password_file').upper()} needs IOPNET_{field.upper()}"
                    )
                setattr(self, field, _with_password(url, encode(_read_secret(path)), f"IOPNET_{field.upper()}"))
        return self

    @model_validator(mode="after")
    def _session_secret_long_enough(self) -> "Settings":
        secret = self.console_session_secret
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            raise WeakSecretError(
                f"the console's session secret has {len(secret.encode())} bytes; at least {MIN_SECRET_BYTES} "
                "are needed: set a longer IOPNET_CONSOLE_SESSION_SECRET(_FILE), or unset it (derived from the JWT "
                "secret)"
            )
        return self

    @model_validator(mode="after")
    def _tokens_we_mint_are_accepted(self) -> "Settings":
        if self.jwt_ttl_seconds > self.jwt_max_ttl_seconds:
            raise ValueError("jwt_ttl_seconds exceeds jwt_max_ttl_seconds: minted tokens would be refused")
        return self

    @property
    def effective_nats_url(self) -> str:
        return self.nats_url or f"nats://{self.embedded_nats_host}:{self.embedded_nats_port}"

    def database_url(self, service: ServiceName) -> str:
        given = getattr(self, f"{service}_database_url")
        return given or f"sqlite+aiosqlite:///{self.data_dir / f'{service}.db'}"

    def port(self, service: ServiceName) -> int:
        return int(getattr(self, f"{service}_port"))

    def base_url(self, service: ServiceName) -> str:
        given = getattr(self, f"{service}_url")
        return str(given).rstrip("/") if given else f"http://{self.http_host}:{self.port(service)}"

    @cached_property
    def signing_secret(self) -> str:
        if self.jwt_secret:
            return self.jwt_secret
        path = self.data_dir / "jwt.secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _publish_private(path, secrets.token_urlsafe(48))
        # A hand-edited or truncated file is refused as an environment secret would be.
        return check_secret(path.read_text().strip(), str(path))


_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}


def async_database_url(url: str) -> str:
    """The URL with the driver the services use (asyncpg, aiosqlite); ValueError, naming
    the forms accepted, for another database or driver."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError("a database URL looks like postgresql+asyncpg://user@host:5432/name or sqlite:///path.db")
    backend, _, driver = scheme.lower().partition("+")
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"the database {backend!r} is not supported: PostgreSQL or SQLite")
    wanted = _ASYNC_DRIVERS[backend]
    if driver and f"{backend}+{driver}" != wanted:
        raise ValueError(f"the driver {driver!r} is not used: write {wanted}://… (or {backend}://…)")
    return f"{wanted}://{rest}"


def _read_secret(path: Path) -> str:
    try:
        content = path.read_text()
    except OSError as error:
        raise SecretFileError(f"cannot read the secret file {path}: {error.strerror}") from None
    # One final newline (echo, most editors) is not part of the secret; other whitespace is.
    secret = content.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise SecretFileError(f"the secret file {path} is empty")
    return secret


def _not_both(value: str | None, name: str) -> None:
    if value:
        raise SecretFileError(f"{name} and {name}_FILE are both set: give the secret one way")


def _percent_encoded(password: str) -> str:
    # SQLAlchemy decodes %XX in the password of a URL.
    return quote(password, safe="")


def _nats_userinfo(password: str) -> str:
    # nats-py takes the password from the URL as written (no %XX decoding), so it must be
    # a character set that a URL carries as is: a generated (hex, base64url) password is.
    if any(c in password for c in "@:/?#[]%") or any(c.isspace() for c in password):
        raise SecretFileError("a NATS password may not hold @ : / ? # [ ] % or whitespace (it travels in the URL)")
    return password


def _with_password(url: str, password: str, name: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or not userinfo:
        raise SecretFileError(f"{name} names no user: a password file needs one (scheme://user@host)")
    if ":" in userinfo:
        raise SecretFileError(f"{name} already holds a password: give it in the URL or in the file, not both")
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{password}@{hostport}"))


def _publish_private(path: Path, content: str) -> None:
    """Write `content` to `path` (mode 0600) unless it exists. Written to a scratch file
    and linked into place: a process racing at first start sees no file or the whole
    secret, never an empty one, and both agree on the first one linked."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        with contextlib.suppress(FileExistsError):  # another process linked first: use theirs
            os.link(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
