"""The one clock every service reads (DESIGN B4: store UTC).

Use cases take `now`/`today` as parameters so rules can be exercised at any instant;
the routes, handlers, loops and stores that supply them read the time here."""

from datetime import UTC, date, datetime


def now() -> datetime:
    """The current instant, timezone-aware in UTC."""
    return datetime.now(UTC)


def today() -> date:
    """Today's date in UTC (a site's own calendar day comes from its timezone)."""
    return now().date()
