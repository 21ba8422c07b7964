"""The console's pure rules: what a signed-in person is, which screens their role
opens, what a safety concern must show at once, and the English and Spanish texts.

The console owns no patient data (issue 13): it holds the caller's token and asks the
three services with it, so every answer is scoped and audited there."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

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
    return "/patients"


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
