"""Notification rules, free of I/O: templates and who gets what on which channel.

Patient messages are discreet: a phone screen or a shared inbox must not reveal that
someone is in care, so no template names the program, a diagnosis, a substance or
words such as recovery, addiction, rehab or treatment.
"""

from string import Template
from typing import Literal

Channel = Literal["console", "email", "sms", "webhook"]

DEFAULT_LANGUAGE = "en"
FORBIDDEN_WORDS = (
    "recovery", "addiction", "rehab", "treatment", "program", "iop", "substance",
    "alcohol", "opioid", "drug", "diagnosis", "therapy", "clinic", "sober", "relapse",
)  # fmt: skip

TEMPLATES: dict[str, dict[str, str]] = {
    "welcome": {
        "en": "Hello! You're all set. We look forward to seeing you on $start_date.",
        "es": "¡Hola! Todo está listo. Le esperamos el $start_date.",
    },
}


class UnknownTemplate(KeyError):
    pass


def render(template: str, language: str, **values: str) -> str:
    try:
        variants = TEMPLATES[template]
    except KeyError:
        raise UnknownTemplate(template) from None
    text = variants.get(language) or variants[DEFAULT_LANGUAGE]
    return Template(text).substitute(values)


def patient_channel(preferred: str, live_channels: bool) -> Channel | None:
    """The channel a patient message goes out on; None when the patient wants none."""
    if preferred == "none":
        return None
    if not live_channels:
        return "console"
    return "sms" if preferred == "sms" else "email"


def recipient_key(kind: str, ident: str) -> str:
    return f"{kind}:{ident}"
