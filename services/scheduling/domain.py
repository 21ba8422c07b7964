"""Scheduling rules, free of I/O."""

from shared.contracts.events import Cohort

# ASAM level 2.1 (IOP): at least 9 hours a week for adults, 6 for adolescents.
WEEKLY_HOURS_TARGET: dict[str, float] = {"adult": 9.0, "adolescent": 6.0}


def weekly_hours_target(cohort: Cohort) -> float:
    return WEEKLY_HOURS_TARGET[cohort]
