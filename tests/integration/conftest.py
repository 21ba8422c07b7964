"""The console's test network, for its integration tests (tests/console.py)."""

from tests.console import issuer, network  # noqa: F401  (fixtures, by name)
