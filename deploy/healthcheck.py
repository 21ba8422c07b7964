"""The image's HEALTHCHECK: GET /readyz of the iopnet service (or console) this container runs.

Standard library only (the image has no curl). The service is IOPNET_SERVICE if set,
else the word after `serve` in the container's command (`iopnet serve scheduling`, read
from /proc/1/cmdline); its port is IOPNET_<SERVICE>_PORT or the default (8001-8003, the
console 8000).
Exit 0 when /readyz answers 200 within the timeout, 1 otherwise (a line on stderr says why).
"""

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"intake": 8001, "scheduling": 8002, "notifications": 8003, "console": 8000}
TIMEOUT_SECONDS = 3.0


def service_name(environ: dict[str, str], cmdline: bytes) -> str:
    given = environ.get("IOPNET_SERVICE")
    if given:
        return given
    argv = [part.decode(errors="replace") for part in cmdline.split(b"\0")]
    for index, word in enumerate(argv[:-1]):
        if word == "serve":
            return argv[index + 1]
    raise LookupError("no `serve <service>` in the container's command: set IOPNET_SERVICE")


def readyz_url(service: str, environ: dict[str, str]) -> str:
    if service not in DEFAULT_PORTS:
        raise LookupError(f"unknown service {service!r}")
    port = int(environ.get(f"IOPNET_{service.upper()}_PORT", DEFAULT_PORTS[service]))
    return f"http://127.0.0.1:{port}/readyz"


def check(url: str, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """None if `url` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as error:
        return f"{url} answered {error.code}"
    except (OSError, ValueError) as error:
        return f"{url}: {error}"


def main() -> int:
    environ = dict(os.environ)
    try:
        cmdline = b"" if environ.get("IOPNET_SERVICE") else Path("/proc/1/cmdline").read_bytes()
        url = readyz_url(service_name(environ, cmdline), environ)
    except (LookupError, OSError, ValueError) as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 1
    problem = check(url)
    if problem is not None:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
