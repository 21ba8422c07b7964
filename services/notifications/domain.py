"""Notification rules, free of I/O: templates, the consent gate, quiet and business
hours in site time, reminder times, absence streaks, escalation and retry backoff.

Patient messages are discreet: a phone screen or a shared inbox must not reveal that
someone is in care, so no patient template names the program, a diagnosis, a substance
or words such as recovery, addiction, rehab or treatment (FORBIDDEN_WORDS, checked for
every template in every language by tests/unit/test_notifications_domain.py).

Where the rules apply (the `live` flag, setting IOPNET_NOTIFY_LIVE_CHANNELS):
- Live channels (email, SMS, webhook) hand a message to a third party (a mail server,
  an SMS provider, another system) and reach a person. The consent gate and quiet
  hours apply there.
- The console channel (development default) reaches nobody: it logs ids only and
  discloses nothing, so a patient without any consent on record still gets console
  messages at their nominal time. A patient who *revoked* consent gets none, on any
  channel: a revocation is an explicit refusal.
"""

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from string import Template
from typing import ClassVar, Literal, Protocol
from zoneinfo import ZoneInfo

Channel = Literal["console", "email", "sms", "webhook"]
Severity = Literal["info", "warning", "urgent"]
RecipientKind = Literal["patient", "care_team", "integration"]

DEFAULT_LANGUAGE = "en"
DEFAULT_TIMEZONE = "UTC"  # until the site's SiteRegistered arrives

# Words no patient message may contain (whole words, any case), English and Spanish.
FORBIDDEN_WORDS = (
    # the design brief
    "recovery", "addiction", "addicted", "rehab", "rehabilitation", "treatment",
    # the program, the care setting, the people in it
    "program", "programme", "iop", "outpatient", "inpatient", "clinic", "clinical", "therapy",
    "therapist", "counseling", "counselling", "counselor", "psychiatric", "psychiatrist",
    "behavioral", "behavioural", "mental", "diagnosis", "patient", "group",
    # substances and what goes with them
    "substance", "substances", "alcohol", "alcoholic", "opioid", "opioids", "opiate", "heroin",
    "fentanyl", "cocaine", "methadone", "suboxone", "buprenorphine", "naloxone", "narcan", "drug",
    "drugs", "detox", "withdrawal", "overdose", "sober", "sobriety", "relapse", "abuse",
    "dependence", "craving", "cravings", "aa", "na",
    # Spanish
    "recuperación", "adicción", "rehabilitación", "tratamiento", "programa", "clínica", "terapia",
    "terapeuta", "consejería", "psiquiátrico", "diagnóstico", "paciente", "grupo", "sustancia",
    "sustancias", "alcohol", "droga", "drogas", "desintoxicación", "abstinencia", "sobredosis",
    "sobriedad", "recaída", "abuso", "dependencia",
)  # fmt: skip

# Message bodies per template and language. Patient templates take only neutral values
# (a date, a time); care-team templates are internal and name the patient by id only.
TEMPLATES: dict[str, dict[str, str]] = {
    "welcome": {
        "en": "Hello! You're all set. We look forward to seeing you on $start_date.",
        "es": "¡Hola! Todo está listo. Le esperamos el $start_date.",
    },
    "reminder_24h": {
        "en": "Reminder: you have an appointment on $date at $time. Reply to this message if you cannot make it.",
        "es": "Recordatorio: tiene una cita el $date a las $time. Responda a este mensaje si no puede asistir.",
    },
    "reminder_2h": {
        "en": "See you soon: your appointment today starts at $time.",
        "es": "Hasta pronto: su cita de hoy empieza a las $time.",
    },
    "missed_you": {
        "en": "We missed you today. We hope all is well, and we look forward to seeing you next time.",
        "es": "Hoy le echamos de menos. Esperamos que todo vaya bien y le esperamos la próxima vez.",
    },
    "care_urgent_check_in": {
        "en": "URGENT: a check-in needs attention now. Person $patient_id at site $site_id. "
        "Alert $alert_id: acknowledge it in iopnet (POST /alerts/$alert_id/acknowledge).",
        "es": "URGENTE: un registro diario requiere atención inmediata. Persona $patient_id, sede $site_id. "
        "Alerta $alert_id: confírmela en iopnet (POST /alerts/$alert_id/acknowledge).",
    },
    "care_escalated": {
        "en": "URGENT (escalated, not yet acknowledged): a check-in needs attention now. Person $patient_id "
        "at site $site_id. Alert $alert_id: acknowledge it in iopnet (POST /alerts/$alert_id/acknowledge).",
        "es": "URGENTE (escalada, sin confirmar): un registro diario requiere atención inmediata. Persona "
        "$patient_id, sede $site_id. Alerta $alert_id: confírmela en iopnet (POST /alerts/$alert_id/acknowledge).",
    },
    "care_elevated_check_in": {
        "en": "A check-in of person $patient_id at site $site_id asks for follow-up today (alert $alert_id).",
        "es": "Un registro diario de la persona $patient_id en la sede $site_id pide seguimiento hoy "
        "(alerta $alert_id).",
    },
    "care_two_absences": {
        "en": "Person $patient_id at site $site_id missed two sessions in a row (alert $alert_id).",
        "es": "La persona $patient_id en la sede $site_id faltó a dos sesiones seguidas (alerta $alert_id).",
    },
    "care_hours_at_risk": {
        "en": "Person $patient_id at site $site_id may not reach this week's hours ($iso_week: $attended_hours "
        "of $target_hours h attended, $remaining_hours h booked) (alert $alert_id).",
        "es": "Es posible que la persona $patient_id en la sede $site_id no alcance las horas de esta semana "
        "($iso_week: $attended_hours de $target_hours h asistidas, $remaining_hours h reservadas) "
        "(alerta $alert_id).",
    },
    "care_weekly_shortfall": {
        "en": "Person $patient_id at site $site_id ended week $iso_week below target: $attended_hours of "
        "$target_hours h (alert $alert_id).",
        "es": "La persona $patient_id en la sede $site_id terminó la semana $iso_week por debajo del objetivo: "
        "$attended_hours de $target_hours h (alerta $alert_id).",
    },
}

# Email subject lines: as discreet as the bodies.
SUBJECTS: dict[str, dict[str, str]] = {
    "patient": {"en": "A message for you", "es": "Un mensaje para usted"},
    "care_team": {"en": "iopnet care-team alert", "es": "Alerta para el equipo de iopnet"},
    "care_urgent": {"en": "URGENT iopnet care-team alert", "es": "Alerta URGENTE para el equipo de iopnet"},
}

PATIENT_TEMPLATES = frozenset({"welcome", "reminder_24h", "reminder_2h", "missed_you"})
CARE_TEAM_TEMPLATES = frozenset(t for t in TEMPLATES if t.startswith("care_"))
URGENT_TEMPLATES = frozenset({"care_urgent_check_in", "care_escalated"})

# What a care-team alert is about: reason code -> (severity, template). Codes, no text.
ALERT_KINDS: dict[str, tuple[Severity, str]] = {
    "urgent_check_in": ("urgent", "care_urgent_check_in"),
    "elevated_check_in": ("warning", "care_elevated_check_in"),
    "two_absences": ("warning", "care_two_absences"),
    "hours_at_risk": ("info", "care_hours_at_risk"),
    "weekly_hours_shortfall": ("info", "care_weekly_shortfall"),
}
ESCALATED_REASON = "escalated"

# A message that could not go out within this long after it was due is stale.
MISSED_YOU_VALID = timedelta(hours=48)
WELCOME_VALID = timedelta(days=7)


class UnknownTemplate(KeyError):
    pass


def text_key(template: str) -> str:
    """The body a template name renders with: reminders at a configured offset
    (`reminder_90m`, `reminder_48h`) read like the 2 h or the 24 h reminder."""
    if template in TEMPLATES:
        return template
    match = re.fullmatch(r"reminder_(\d+)([mh])", template)
    if match is None:
        raise UnknownTemplate(template)
    minutes = int(match.group(1)) * (60 if match.group(2) == "h" else 1)
    return "reminder_24h" if minutes >= 6 * 60 else "reminder_2h"


def render(template: str, language: str, **values: str) -> str:
    variants = TEMPLATES[text_key(template)]
    text = variants.get(language) or variants[DEFAULT_LANGUAGE]
    return Template(text).substitute(values)


def subject_line(template: str, language: str) -> str:
    key = text_key(template)
    if key in URGENT_TEMPLATES:
        variants = SUBJECTS["care_urgent"]
    else:
        variants = SUBJECTS["care_team" if key in CARE_TEAM_TEMPLATES else "patient"]
    return variants.get(language) or variants[DEFAULT_LANGUAGE]


def patient_channel(preferred: str, live_channels: bool) -> Channel | None:
    """The channel a patient message goes out on; None when the patient wants none."""
    if preferred == "none":
        return None
    if not live_channels:
        return "console"
    return "sms" if preferred == "sms" else "email"


def recipient_key(kind: str, ident: str) -> str:
    return f"{kind}:{ident}"


def member_id(site_id: str, channel: str, address: str) -> str:
    """A stable id for a care-team member (the same person keeps it across roster edits),
    without the address itself: rows and logs carry this, never the address."""
    digest = hashlib.sha256(f"{site_id}|{channel}|{address.strip().lower()}".encode()).hexdigest()
    return digest[:32]


# --- consent (42 CFR Part 2 flavour) ------------------------------------------------------
#
# A consent covers patient messages when its recipient is this service
# ("org:iopnet-notifications") or the patient's own treating providers
# ("class:treating_providers"), in intake's recipient codes, and its purpose is
# "appointment_reminders" or "care_coordination". Both are compared case-insensitively
# with surrounding blanks removed. Anything else (a consent to disclose to an employer,
# a court, a payer, for research) covers nothing here. A consent covers every channel,
# and is active from its grant until its revocation or the end of its `expires_on` day
# in the site's time zone (none: until revoked, e.g. "until the end of treatment").
# Care-team alerts are not gated by patient consent: they stay inside the program
# (internal communication among the staff who treat the patient), and no third party
# learns anything from them.

CONSENT_RECIPIENTS = frozenset({"org:iopnet-notifications", "class:treating_providers"})
CONSENT_PURPOSES = frozenset({"appointment_reminders", "care_coordination"})


def _norm(value: str) -> str:
    return " ".join(value.split()).lower()


def consent_covers(recipient: str, purpose: str) -> bool:
    return _norm(recipient) in CONSENT_RECIPIENTS and _norm(purpose) in CONSENT_PURPOSES


@dataclass(frozen=True)
class Consent:
    recipient: str
    purpose: str
    expires_on: date | None
    revoked: bool

    def active_on(self, local_day: date) -> bool:
        if self.revoked or not consent_covers(self.recipient, self.purpose):
            return False
        return self.expires_on is None or local_day <= self.expires_on


ConsentVerdict = Literal["allow", "hold", "refused"]


def consent_verdict(consents: Iterable[Consent], local_day: date, *, live: bool) -> ConsentVerdict:
    """May a patient message go out now?

    - allow: an active covering consent exists (or, on the console, the patient has
      never refused);
    - hold: no active consent yet (none given, or expired): the message waits for one;
    - refused: every covering consent the patient gave has been revoked.
    """
    covering = [c for c in consents if consent_covers(c.recipient, c.purpose)]
    if any(c.active_on(local_day) for c in covering):
        return "allow"
    if covering and all(c.revoked for c in covering):
        return "refused"
    return "hold" if live else "allow"


# --- site time: quiet hours and business hours --------------------------------------------


def parse_hhmm(value: str) -> time:
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", value)
    if match is None:
        raise ValueError(f"{value!r} is not HH:MM")
    return time(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class Window:
    """A daily site-local window [start, end); it may wrap midnight (21:00-08:00)."""

    start: time
    end: time

    def contains(self, wall: time) -> bool:
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end


def _local(instant: datetime, timezone: str) -> datetime:
    return instant.astimezone(ZoneInfo(timezone))


def _at(local_day: date, wall: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(local_day, wall).replace(tzinfo=zone, fold=0).astimezone(UTC)


def after_quiet_hours(instant: datetime, timezone: str, quiet: Window) -> datetime:
    """`instant` itself, or the end of the quiet hours it falls in (site-local wall
    time, DST-aware: 08:00 is 08:00 on the clock whatever the offset that day)."""
    zone = ZoneInfo(timezone)
    local = instant.astimezone(zone)
    if not quiet.contains(local.time().replace(tzinfo=None)):
        return instant
    day = local.date()
    if quiet.start > quiet.end and local.time() >= quiet.start:
        day += timedelta(days=1)  # evening part of a window that wraps midnight
    return max(instant, _at(day, quiet.end, zone))


def next_business_time(instant: datetime, timezone: str, hours: Window, weekdays: Sequence[int]) -> datetime:
    """`instant` if it falls in business hours on a business day (ISO weekdays), else
    the next opening, in site-local wall time. start == end: open around the clock."""
    zone = ZoneInfo(timezone)
    local = instant.astimezone(zone)
    around_the_clock = hours.start == hours.end
    for offset in range(0, 15):
        day = local.date() + timedelta(days=offset)
        if day.isoweekday() not in weekdays:
            continue
        if around_the_clock:
            return max(instant, _at(day, time(0), zone))
        opens, closes = _at(day, hours.start, zone), _at(day, hours.end, zone)
        if instant < closes:
            return max(instant, opens)
    return instant  # no business day configured: do not hold the message forever


# --- reminders ----------------------------------------------------------------------------


def reminder_template(offset_minutes: int) -> str:
    if offset_minutes % 60 == 0:
        return f"reminder_{offset_minutes // 60}h"
    return f"reminder_{offset_minutes}m"


@dataclass(frozen=True)
class PlannedMessage:
    template: str
    due_at: datetime
    expires_at: datetime | None


def plan_reminders(
    starts_at: datetime,
    offsets_minutes: Iterable[int],
    timezone: str,
    quiet: Window,
    now: datetime,
    *,
    honour_quiet_hours: bool,
) -> list[PlannedMessage]:
    """One reminder per offset before a session, in site time.

    A reminder whose time has already passed when the booking arrives is not planned;
    one falling in quiet hours moves to their end, and is dropped if that is not before
    the session's start. Every reminder expires when the session starts: never sent
    after that.
    """
    planned = []
    for offset in sorted(set(offsets_minutes), reverse=True):
        due = starts_at - timedelta(minutes=offset)
        if due < now - timedelta(minutes=1):
            continue
        due = max(due, now)
        if honour_quiet_hours:
            due = after_quiet_hours(due, timezone, quiet)
        if due >= starts_at:
            continue
        planned.append(PlannedMessage(reminder_template(offset), due, starts_at))
    return planned


def reminder_values(starts_at: datetime, timezone: str) -> dict[str, str]:
    local = _local(starts_at, timezone)
    return {"date": local.date().isoformat(), "time": local.strftime("%H:%M")}


# --- absences -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttendanceMark:
    session_id: str
    starts_at: datetime
    status: str  # present / late / absent / excused


def absence_streaks(marks: Iterable[AttendanceMark]) -> list[list[str]]:
    """Runs of two or more absences in a row (session ids, by session time). Excused
    sessions neither count nor break a run (an agreed absence is no warning sign);
    present or late ends it."""
    ordered = sorted((m for m in marks if m.status != "excused"), key=lambda m: (m.starts_at, m.session_id))
    runs: list[list[str]] = []
    current: list[str] = []
    for mark in ordered:
        if mark.status == "absent":
            current.append(mark.session_id)
            continue
        if len(current) >= 2:
            runs.append(current)
        current = []
    if len(current) >= 2:
        runs.append(current)
    return runs


# --- delivery -----------------------------------------------------------------------------


def backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Delay before retry after `attempt` failed tries: base * 2^(attempt-1), capped,
    then scaled by `jitter` in [0.5, 1.0] (equal jitter: spread, but never immediate)."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay * min(1.0, max(0.5, jitter))


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over f"{timestamp}.{body}" with the subscription's secret."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


# --- webhook subscriptions -------------------------------------------------------------------


class CatalogEntry(Protocol):
    restricted: ClassVar[bool]


def subscribable_event_types(catalog: Mapping[str, type[CatalogEntry]]) -> frozenset[str]:
    """Every public event type of the catalog; never a restricted one (contact details
    travel on iop.restricted.> and leave notifications only as a patient's own message)."""
    return frozenset(name for name, cls in catalog.items() if not cls.restricted)


def webhook_wants(site_id: str, event_types: Iterable[str], subscribable: frozenset[str], event_site: str,
                  event_type: str) -> bool:  # fmt: skip
    """The subscription asked for this event: its site, one of its types, a public one."""
    return event_site == site_id and event_type in subscribable and event_type in set(event_types)


def pause_reason(consecutive_failures: int, threshold: int, last_error: str | None) -> str | None:
    """Why a subscription stops after this many failed attempts in a row, or None."""
    if consecutive_failures < max(1, threshold):
        return None
    return f"{consecutive_failures} consecutive failed deliveries; last: {last_error or 'unknown'}"[:200]


def next_roster_index(level: int, roster_size: int) -> int | None:
    """Whom an unacknowledged urgent alert goes to next (on-call order), or None when
    everyone on the roster has been alerted."""
    following = level + 1
    return following if following < roster_size else None


# --- events of one thing out of order -------------------------------------------------------------
#
# One stream's events normally arrive in order, but not after a consumer restart: the
# messages it had fetched and not acked come back only after ack_wait, behind later ones.
# Each rule here says what a late event may still change.

ACTIVE = "active"
EndStatus = Literal["discharged", "transferred"]


@dataclass(frozen=True)
class EpisodeEnd:
    """A discharge or a transfer-out of one enrollment, as its event tells it."""

    status: EndStatus
    ended_on: date


def opening_status(end: EpisodeEnd | None) -> str:
    """An enrollment whose end arrived first opens ended: no welcome goes out."""
    return end.status if end is not None else ACTIVE


def status_after_end(current: str, end: EpisodeEnd) -> str:
    """An active episode takes the end; an ended one keeps its first end."""
    return end.status if current == ACTIVE else current


def may_plan_for(episode_statuses: Iterable[str]) -> bool:
    """Patient messages about the site's sessions (reminders, "we missed you") are
    planned unless every episode known at the site has ended; with none known yet (the
    enrollment is on another stream and may come later) they are."""
    statuses = list(episode_statuses)
    return not statuses or ACTIVE in statuses


def booking_event_applies(
    stored_at: datetime | None, stored_status: str | None, incoming_at: datetime, incoming_status: str
) -> bool:
    """Whether a PatientBooked/BookingCancelled applies to the booking: the later event
    (its occurred_at, stamped by scheduling) wins, so a cancellation is never undone by
    the booking it cancelled arriving late, while a later re-booking of the same booking
    still applies. The same event again applies again (a repair converges); at a tie
    between the two, the cancellation wins: the safe side is no reminder."""
    if stored_at is None:
        return True
    if incoming_at != stored_at:
        return incoming_at > stored_at
    return incoming_status in (stored_status, "cancelled")


def session_status_after(stored: str | None, incoming: str) -> str:
    """A cancelled session stays cancelled (scheduling never reopens one): a late
    SessionScheduled must not make it bookable again."""
    return stored if stored == "cancelled" else incoming


# --- webhook targets: no server-side request forgery ---------------------------------------------
#
# A webhook URL comes from a user (an integration's subscription, a site admin's roster), and
# this service POSTs to it from inside the network: without a policy it is a way to reach
# the cloud metadata endpoint, our own services on loopback, or anything on the private
# network. The policy: https to public addresses only. The development setting
# IOPNET_NOTIFY_ALLOW_INSECURE_TARGETS also allows plain http and loopback/private targets
# (a local receiver); link-local (169.254.169.254, the metadata endpoint), multicast,
# reserved and unspecified addresses stay refused even then: no development receiver lives
# there. The same rules run at registration (on the URL as written) and at send time (on
# every address the name resolves to), see channels.PinnedTransport.

IPAddress = IPv4Address | IPv6Address
TargetRefusal = Literal[
    "scheme", "userinfo", "no_host", "local_name", "numeric_host", "unresolved",
    "unspecified", "link_local", "multicast", "reserved", "loopback", "private", "shared",
]  # fmt: skip

# Fixed texts (the reason a delivery log and a 422 carry): never the URL or the address.
TARGET_REFUSALS: dict[TargetRefusal, str] = {
    "scheme": "only https targets are allowed (and http in development)",
    "userinfo": "credentials in the URL are not allowed",
    "no_host": "the URL has no host",
    "local_name": "a local host name (localhost, a single label, .local, .internal) is not allowed",
    "numeric_host": "a numeric host that is not a plain IP address is not allowed",
    "unresolved": "the host name did not resolve",
    "unspecified": "the unspecified address is not allowed",
    "link_local": "a link-local address (such as the metadata endpoint) is not allowed",
    "multicast": "a multicast address is not allowed",
    "reserved": "a reserved address is not allowed",
    "loopback": "a loopback address is not allowed",
    "private": "a private or non-public address is not allowed",
    "shared": "a carrier-grade NAT address (100.64.0.0/10) is not allowed",
}

# Refused in every mode; the rest of the non-public space only outside development.
_ALWAYS_REFUSED: frozenset[TargetRefusal] = frozenset(
    {
        "scheme",
        "userinfo",
        "no_host",
        "numeric_host",
        "unresolved",
        "unspecified",
        "link_local",
        "multicast",
        "reserved",
    }
)
_THIS_NETWORK = IPv4Network("0.0.0.0/8")  # "this host on this network": Linux connects it locally
_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT: not private in `ipaddress`, not public either
_NAT64 = (IPv6Network("64:ff9b::/96"), IPv6Network("64:ff9b:1::/48"))
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _translated_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address is only a spelling of: mapped (::ffff:a.b.c.d)
    or NAT64. A connection to it reaches exactly that IPv4 address."""
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in network for network in _NAT64):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 endpoint a 6to4 or Teredo address tunnels to."""
    if isinstance(address, IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    return address.teredo[1] if address.teredo is not None else None


def _address_class(address: IPAddress) -> TargetRefusal | None:
    """What kind of non-public address this is (None: public). Order matters: ::1 is
    both loopback and reserved, 169.254.169.254 both link-local and private."""
    if address.is_unspecified or (isinstance(address, IPv4Address) and address in _THIS_NETWORK):
        return "unspecified"
    if address.is_link_local:
        return "link_local"
    if address.is_multicast:
        return "multicast"
    if address.is_loopback:
        return "loopback"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, IPv4Address) and address in _SHARED:
        return "shared"
    if address.is_private or not address.is_global:
        return "private"
    return None


def address_refusal(address: IPAddress, *, allow_local: bool) -> TargetRefusal | None:
    """Why a webhook may not be sent to `address` (None: it may). `allow_local`: the
    development setting (loopback and private targets allowed)."""
    translated = _translated_ipv4(address)
    if translated is not None:
        verdict = _address_class(translated)  # ::ffff:127.0.0.1 is loopback, whatever the spelling
    else:
        tunnelled = _tunnelled_ipv4(address)
        verdict = (_address_class(tunnelled) if tunnelled is not None else None) or _address_class(address)
    if verdict is None or (allow_local and verdict not in _ALWAYS_REFUSED):
        return None
    return verdict


def addresses_refusal(addresses: Sequence[IPAddress], *, allow_local: bool) -> TargetRefusal | None:
    """Send-time rule for a resolved name: every address must pass, not just the one
    used (a name with one public and one private address is refused)."""
    if not addresses:
        return "unresolved"
    for address in addresses:
        verdict = address_refusal(address, allow_local=allow_local)
        if verdict is not None:
            return verdict
    return None


def parse_ip(host: str) -> IPAddress | None:
    """`host` as an IP literal (brackets, an IPv6 zone id allowed), else None."""
    try:
        return ip_address(host.strip("[]"))
    except ValueError:
        return None


def _name_refusal(name: str, *, allow_local: bool) -> TargetRefusal | None:
    labels = name.split(".")
    # 2130706433, 0x7f.1, 127.1: resolvers read these as IP addresses; no real name looks so.
    if _NUMERIC_LABEL.match(labels[-1]):
        return "numeric_host"
    if allow_local:
        return None
    if name in _LOCAL_NAMES or name.endswith(_LOCAL_SUFFIXES) or len(labels) < 2:
        return "local_name"
    return None


def target_refusal(scheme: str, host: str, *, has_userinfo: bool, allow_insecure: bool) -> TargetRefusal | None:
    """Why a webhook URL may not be registered or used, judged on the URL as parsed by
    the HTTP client that sends it (scheme, host, userinfo); None: allowed. A host name
    is checked again at send time, on every address it resolves to."""
    if scheme not in (("https", "http") if allow_insecure else ("https",)):
        return "scheme"
    if has_userinfo:
        return "userinfo"
    name = host.lower().rstrip(".")
    if not name:
        return "no_host"
    literal = parse_ip(name)
    if literal is not None:
        return address_refusal(literal, allow_local=allow_insecure)
    return _name_refusal(name, allow_local=allow_insecure)


def consent_covers_event(
    *, granted_at: datetime | None, expires_on: date | None, occurred_at: datetime, today: date
) -> bool:
    """A (not revoked) consent lets an event about its patient go to the integration it
    names if it has not expired and was granted before the event happened: nothing from
    before the patient agreed (intake's feed applies the same rule)."""
    if expires_on is not None and expires_on < today:
        return False
    return granted_at is not None and granted_at <= occurred_at
