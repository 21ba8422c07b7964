"""The browser tests run on the console's test network (tests/integration/test_console.py)."""

from tests.integration.test_console import issuer, network  # noqa: F401  (fixtures, by name)
