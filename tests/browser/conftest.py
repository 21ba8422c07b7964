"""The browser tests run on the console's test network (tests/console.py)."""

from tests.console import issuer, network  # noqa: F401  (fixtures, by name)
