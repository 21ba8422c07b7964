"""The one error a broken business rule raises, in every service (DESIGN B1).

Domain and use-case code raise `DomainError` with its kind; `shared.errors` turns each
kind into the A6 answer in one exception handler. Nothing here knows HTTP: raised in an
event handler, the same error fails that message (and it is retried), as any other.
"""

from collections.abc import Mapping
from typing import Literal

Kind = Literal["conflict", "invalid", "not_found"]


class DomainError(ValueError):
    """A rule was broken.

    `kind`: conflict (the record's state refuses the change), invalid (the input breaks
    a rule) or not_found. `field` names the input at fault, if one is; `fields` names
    several, each with what is wrong with it (else `{field: message}`).

    A ValueError, so a rule checked inside a pydantic validator answers 422 like any
    other bad input. `keeps_audit`: the refusal disclosed a record and wrote the audit
    row for it, which `shared.db.transaction` commits before the error propagates.
    """

    def __init__(
        self,
        kind: Kind,
        message: str,
        field: str | None = None,
        *,
        fields: Mapping[str, str] | None = None,
        keeps_audit: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message
        self.field = field
        self.fields = dict(fields) if fields is not None else ({field: message} if field else {})
        self.keeps_audit = keeps_audit
