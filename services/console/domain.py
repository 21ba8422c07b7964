"""The console's pure rules: what a signed-in person is, which screens their role
opens, what a safety concern must show at once, and the English and Spanish texts.

The console owns no patient data (issue 13): it holds the caller's token and asks the
three services with it, so every answer is scoped and audited there."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Language = Literal["en", "es"]
LANGUAGES: tuple[Language, ...] = ("en", "es")
STAFF_ROLES = ("network_admin", "site_admin", "clinician", "front_desk")
CLINICAL_ROLES = ("network_admin", "site_admin", "clinician")


@dataclass(frozen=True)
class Person:
    """Who is signed in, as the token says (the services check it again on every call)."""

    sub: str
    role: str
    sites: tuple[str, ...]
    patient_id: str | None
    token: str
    expires_at: datetime
    via: Literal["oidc", "development"]

    @property
    def is_staff(self) -> bool:
        return self.role in STAFF_ROLES

    @property
    def is_clinical(self) -> bool:
        return self.role in CLINICAL_ROLES


def home_for(person: Person) -> str:
    """Where a person lands after signing in."""
    if person.role == "patient":
        return "/me"
    if person.is_clinical:
        return "/alerts"
    return "/today"


ADMIN_ROLES = ("network_admin", "site_admin")
ATTENDANCE = ("present", "late", "absent", "excused")
# A late arrival is counted as attending all but the first quarter hour (the clinician
# can correct the minutes through the API); absent and excused count none.
LATE_MINUTES_MISSED = 15


def attended_minutes(status: str, session_minutes: int) -> int:
    """The minutes one tap records for a patient: what the hours report then counts."""
    if status == "present":
        return session_minutes
    if status == "late":
        return max(session_minutes - LATE_MINUTES_MISSED, 0)
    return 0


@dataclass(frozen=True)
class Trend:
    """Mood and craving over the check-ins, as two polylines for an inline SVG chart
    (drawn on the server: no chart script, no data in the browser beyond the page)."""

    width: int
    height: int
    mood: str
    craving: str
    count: int


def trend(points: list[tuple[int, int]], width: int = 480, height: int = 160, pad: int = 12) -> Trend:
    """`points`: (mood 1-10, craving 0-10) oldest first; both on one 0-10 scale."""
    if not points:
        return Trend(width, height, "", "", 0)
    step = (width - 2 * pad) / max(len(points) - 1, 1)

    def line(values: list[int]) -> str:
        return " ".join(
            f"{pad + i * step:.1f},{height - pad - (height - 2 * pad) * v / 10:.1f}" for i, v in enumerate(values)
        )

    return Trend(width, height, line([m for m, _ in points]), line([c for _, c in points]), len(points))


def idle_expired(last_seen: datetime, now: datetime, idle: timedelta) -> bool:
    return now - last_seen > idle


def token_expired(person: Person, now: datetime | None = None) -> bool:
    return (now or datetime.now(UTC)) >= person.expires_at


# A safety concern shows this before anything else, and whatever else fails (the check-in
# request included): the page carries it, hidden, and shows it the moment the box is ticked.
CRISIS_LINES = {
    "en": [
        ("988", "Call or text 988, the Suicide & Crisis Lifeline (US), any time."),
        ("911", "In immediate danger, call 911."),
        ("clinic", "Your care team is told the moment you send this check-in."),
    ],
    "es": [
        (
            "988",
            "Llame o envíe un mensaje de texto al 988, la Línea de Prevención del Suicidio y Crisis, a cualquier hora.",
        ),
        ("911", "Si está en peligro inmediato, llame al 911."),
        ("clinic", "Su equipo de atención recibe un aviso en cuanto envíe este registro."),
    ],
}

TEXTS: dict[str, dict[Language, str]] = {
    "app": {"en": "iopnet console", "es": "consola iopnet"},
    "sign_in": {"en": "Sign in", "es": "Iniciar sesión"},
    "sign_in_provider": {"en": "Sign in with your organization", "es": "Iniciar sesión con su organización"},
    "sign_out": {"en": "Sign out", "es": "Cerrar sesión"},
    "dev_sign_in": {
        "en": "Development sign-in (not for production): pick a demo user",
        "es": "Inicio de sesión de desarrollo (no para producción): elija un usuario de demostración",
    },
    "signed_out_idle": {
        "en": "You were signed out after a period without activity.",
        "es": "Se cerró su sesión tras un periodo sin actividad.",
    },
    "alerts": {"en": "Alerts", "es": "Alertas"},
    "open_alerts": {"en": "Open alerts, newest first", "es": "Alertas abiertas, las más recientes primero"},
    "no_alerts": {"en": "No open alerts.", "es": "No hay alertas abiertas."},
    "acknowledge": {"en": "Acknowledge", "es": "Confirmar recepción"},
    "acknowledged": {"en": "Acknowledged", "es": "Recibida"},
    "severity": {"en": "Severity", "es": "Gravedad"},
    "patient": {"en": "Patient", "es": "Paciente"},
    "raised": {"en": "Raised", "es": "Generada"},
    "reason": {"en": "Reason", "es": "Motivo"},
    "live": {
        "en": "Live: new alerts appear here without reloading.",
        "es": "En vivo: las alertas nuevas aparecen aquí sin recargar.",
    },
    "patients": {"en": "Patients", "es": "Pacientes"},
    "search": {"en": "Search", "es": "Buscar"},
    "name": {"en": "Name", "es": "Nombre"},
    "birth_date": {"en": "Date of birth", "es": "Fecha de nacimiento"},
    "no_patients": {"en": "No patient found.", "es": "No se encontró ningún paciente."},
    "todays_check_in": {"en": "Today's check-in", "es": "Registro de hoy"},
    "mood": {"en": "Mood (1 low – 10 good)", "es": "Ánimo (1 bajo – 10 bueno)"},
    "craving": {"en": "Craving (0 none – 10 strong)", "es": "Deseo de consumir (0 nada – 10 fuerte)"},
    "used": {"en": "I used since my last check-in", "es": "Consumí desde mi último registro"},
    "safety": {"en": "I am worried about my safety", "es": "Me preocupa mi seguridad"},
    "sleep": {"en": "Hours of sleep", "es": "Horas de sueño"},
    "note": {"en": "A note for your care team (optional)", "es": "Una nota para su equipo (opcional)"},
    "submit": {"en": "Send check-in", "es": "Enviar registro"},
    "check_in_sent": {"en": "Thank you. Your check-in was received.", "es": "Gracias. Recibimos su registro."},
    "check_in_failed": {
        "en": "Your check-in could not be sent. Please try again, or call your clinic.",
        "es": "No se pudo enviar su registro. Inténtelo de nuevo o llame a su clínica.",
    },
    "crisis_title": {"en": "Help is available now", "es": "Hay ayuda disponible ahora"},
    "my_schedule": {"en": "My schedule", "es": "Mi horario"},
    "no_sessions": {"en": "No upcoming sessions.", "es": "No hay sesiones próximas."},
    "language": {"en": "Español", "es": "English"},
    "error": {"en": "Something went wrong.", "es": "Algo salió mal."},
    "forbidden": {"en": "This screen is not for your role.", "es": "Esta pantalla no es para su función."},
    "skip": {"en": "Skip to content", "es": "Saltar al contenido"},
    "today": {"en": "Today", "es": "Hoy"},
    "today_at": {"en": "Today's sessions", "es": "Sesiones de hoy"},
    "site": {"en": "Site", "es": "Sede"},
    "show": {"en": "Show", "es": "Mostrar"},
    "no_sessions_today": {"en": "No sessions today.", "es": "No hay sesiones hoy."},
    "roster": {"en": "Roster", "es": "Lista"},
    "waitlist": {"en": "Waitlist", "es": "Lista de espera"},
    "empty_roster": {"en": "Nobody booked yet.", "es": "Nadie reservado todavía."},
    "attendance": {"en": "Attendance", "es": "Asistencia"},
    "present": {"en": "Present", "es": "Presente"},
    "late": {"en": "Late", "es": "Tarde"},
    "absent": {"en": "Absent", "es": "Ausente"},
    "excused": {"en": "Excused", "es": "Justificado"},
    "not_recorded": {"en": "not recorded", "es": "sin registrar"},
    "register_patient": {"en": "Register a patient", "es": "Registrar a un paciente"},
    "given_name": {"en": "Given name", "es": "Nombre"},
    "family_name": {"en": "Family name", "es": "Apellido"},
    "phone": {"en": "Mobile phone (+1…)", "es": "Teléfono móvil (+1…)"},
    "email": {"en": "Email", "es": "Correo electrónico"},
    "preferred_channel": {"en": "Reminders by", "es": "Recordatorios por"},
    "none": {"en": "None", "es": "Ninguno"},
    "patient_language": {"en": "Patient's language", "es": "Idioma del paciente"},
    "possible_duplicate": {
        "en": "This may be a patient who is already registered:",
        "es": "Puede que este paciente ya esté registrado:",
    },
    "confirm_not_duplicate": {"en": "I checked: this is a different person", "es": "Lo comprobé: es otra persona"},
    "register": {"en": "Register", "es": "Registrar"},
    "open_record": {"en": "Open the record", "es": "Abrir el expediente"},
    "mrn": {"en": "Record number", "es": "Número de expediente"},
    "enrollments": {"en": "Episodes and level of care", "es": "Episodios y nivel de atención"},
    "no_enrollments": {"en": "Not enrolled.", "es": "Sin inscripción."},
    "enroll": {"en": "Enroll", "es": "Inscribir"},
    "program": {"en": "Program", "es": "Programa"},
    "level_of_care": {"en": "Level of care", "es": "Nivel de atención"},
    "cohort": {"en": "Cohort", "es": "Grupo"},
    "start_date": {"en": "Start date", "es": "Fecha de inicio"},
    "referral_source": {"en": "Referred by", "es": "Derivado por"},
    "history": {"en": "History", "es": "Historial"},
    "plan_goals": {"en": "Recovery plan goals", "es": "Metas del plan de recuperación"},
    "no_goals": {"en": "No goals yet.", "es": "Todavía no hay metas."},
    "check_ins": {"en": "Check-ins", "es": "Registros"},
    "trend": {
        "en": "Mood (blue) and craving (red), oldest to newest",
        "es": "Ánimo (azul) y deseo de consumir (rojo), del más antiguo al más reciente",
    },
    "no_check_ins": {"en": "No check-ins yet.", "es": "Todavía no hay registros."},
    "bookings": {"en": "Bookings", "es": "Reservas"},
    "no_bookings": {"en": "No bookings.", "es": "No hay reservas."},
    "consents": {"en": "Consents", "es": "Consentimientos"},
    "no_consents": {"en": "No consents.", "es": "No hay consentimientos."},
    "grant_consent": {"en": "Record a signed consent", "es": "Registrar un consentimiento firmado"},
    "recipient": {
        "en": "Recipient (class:…, org:… or person:<id>)",
        "es": "Destinatario (class:…, org:… o person:<id>)",
    },
    "purpose": {"en": "Purpose", "es": "Finalidad"},
    "information": {"en": "Information to disclose", "es": "Información que se divulga"},
    "expires_on": {"en": "Expires on", "es": "Vence el"},
    "grant": {"en": "Record consent", "es": "Registrar consentimiento"},
    "revoke": {"en": "Revoke", "es": "Revocar"},
    "messages": {"en": "Messages sent", "es": "Mensajes enviados"},
    "no_messages": {"en": "No messages.", "es": "No hay mensajes."},
    "audit": {"en": "Audit trail", "es": "Registro de auditoría"},
    "disclosures": {"en": "Accounting of disclosures", "es": "Registro de divulgaciones"},
    "no_disclosures": {"en": "No disclosures.", "es": "No hay divulgaciones."},
    "status": {"en": "Status", "es": "Estado"},
    "when": {"en": "When", "es": "Cuándo"},
    "who": {"en": "Who", "es": "Quién"},
    "what": {"en": "What", "es": "Qué"},
    "channel": {"en": "Channel", "es": "Canal"},
    "session": {"en": "Session", "es": "Sesión"},
    "programs": {"en": "Programs", "es": "Programas"},
    "calendar_week": {"en": "This week", "es": "Esta semana"},
    "program_name": {"en": "Program name", "es": "Nombre del programa"},
    "weekly_hours": {"en": "Weekly hours target", "es": "Horas semanales previstas"},
    "weekly_template": {"en": "Weekly template", "es": "Plantilla semanal"},
    "weekday": {"en": "Day", "es": "Día"},
    "start": {"en": "Starts (HH:MM)", "es": "Empieza (HH:MM)"},
    "minutes": {"en": "Minutes", "es": "Minutos"},
    "kind": {"en": "Kind", "es": "Tipo"},
    "title": {"en": "Title", "es": "Título"},
    "publish_program": {"en": "Publish program", "es": "Publicar programa"},
    "closures": {"en": "Closures", "es": "Cierres"},
    "closure_date": {"en": "Closed on", "es": "Cerrado el"},
    "add_closure": {"en": "Close the site that day", "es": "Cerrar la sede ese día"},
    "hours_report": {"en": "Hours report", "es": "Informe de horas"},
    "at_risk": {
        "en": "Enrollments at risk of missing their hours",
        "es": "Inscripciones en riesgo de no cumplir sus horas",
    },
    "none_at_risk": {"en": "None at risk this week.", "es": "Ninguna en riesgo esta semana."},
    "care_team": {"en": "Care team", "es": "Equipo de atención"},
    "care_team_hint": {
        "en": "In on-call order: the first is alerted first.",
        "es": "En orden de guardia: se avisa primero al primero.",
    },
    "member_name": {"en": "Name", "es": "Nombre"},
    "role": {"en": "Role", "es": "Función"},
    "address": {"en": "Address (email or +1 phone)", "es": "Dirección (correo o teléfono +1)"},
    "add_member": {"en": "Add to the care team", "es": "Añadir al equipo"},
    "remove": {"en": "Remove", "es": "Quitar"},
    "notification_settings": {"en": "Notification settings", "es": "Ajustes de avisos"},
    "reminder_offsets": {
        "en": "Reminders, minutes before a session (comma-separated)",
        "es": "Recordatorios, minutos antes de una sesión (separados por comas)",
    },
    "quiet_start": {"en": "Quiet hours start (HH:MM)", "es": "Inicio de horas de silencio (HH:MM)"},
    "quiet_end": {"en": "Quiet hours end (HH:MM)", "es": "Fin de horas de silencio (HH:MM)"},
    "save": {"en": "Save", "es": "Guardar"},
    "saved": {"en": "Saved.", "es": "Guardado."},
    "network": {"en": "Network", "es": "Red"},
    "sites": {"en": "Sites", "es": "Sedes"},
    "add_site": {"en": "Add a site", "es": "Añadir una sede"},
    "site_id": {
        "en": "Site id (lowercase, e.g. dayton-north)",
        "es": "Id de la sede (minúsculas, p. ej. dayton-north)",
    },
    "site_name": {"en": "Site name", "es": "Nombre de la sede"},
    "timezone": {"en": "Time zone (e.g. America/New_York)", "es": "Zona horaria (p. ej. America/New_York)"},
    "integrations": {"en": "Integrations", "es": "Integraciones"},
    "no_integrations": {"en": "No integrations.", "es": "No hay integraciones."},
    "integration_id": {"en": "Integration id", "es": "Id de la integración"},
    "integration_sites": {"en": "Sites (comma-separated)", "es": "Sedes (separadas por comas)"},
    "basis": {"en": "Basis", "es": "Base legal"},
    "register_integration": {"en": "Register the integration", "es": "Registrar la integración"},
    "password_once": {
        "en": "The integration's NATS password, shown once:",
        "es": "La contraseña NATS de la integración, se muestra una vez:",
    },
    "settings": {"en": "Settings", "es": "Ajustes"},
    "my_consents": {"en": "My consents", "es": "Mis consentimientos"},
    "consent_revoked": {"en": "The consent is revoked.", "es": "El consentimiento quedó revocado."},
    "enrolled_count": {"en": "Enrolled", "es": "Inscritos"},
    "hours_attended": {"en": "Hours attended / target", "es": "Horas asistidas / previstas"},
    "attendance_rate": {"en": "Attendance rate", "es": "Tasa de asistencia"},
}


def text(key: str, language: Language) -> str:
    return TEXTS[key][language]


def language_from(header: str | None, chosen: str | None) -> Language:
    """The language the person chose, else the browser's first supported one, else English."""
    if chosen in LANGUAGES:
        return chosen  # type: ignore[return-value]
    for part in (header or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGUAGES:
            return code  # type: ignore[return-value]
    return "en"


def local_time(instant: str | datetime, zone: str | None, with_date: bool = True) -> str:
    """An instant as the clinic's wall clock shows it (the services answer in UTC)."""
    when = datetime.fromisoformat(instant) if isinstance(instant, str) else instant
    try:
        local = when.astimezone(ZoneInfo(zone or "UTC"))
    except ZoneInfoNotFoundError:
        local = when.astimezone(UTC)
    return local.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M")
