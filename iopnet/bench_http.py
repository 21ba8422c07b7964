"""The load generator's HTTP client.

aiohttp rather than httpx (which the tests and the CLI use): on this 2-core machine the
benchmark shares the cores with the network it measures, and httpx spent 3.4-6 ms of
CPU per check-in request here, as much as intake spent answering it (`request_cost` in
bench/results/*.json). A load generator that heavy takes the cores the services need
and becomes the bottleneck the issue says it must not be.

`LoadClient` answers with `Answer`, which has the few parts of httpx's Response the
benchmark reads (status_code, json(), text, raise_for_status())."""

import json
from dataclasses import dataclass
from typing import Any

import aiohttp


class HTTPStatusError(Exception):
    def __init__(self, method: str, url: str, status_code: int) -> None:
        super().__init__(f"{method} {url}: {status_code}")
        self.status_code = status_code


@dataclass(frozen=True)
class Answer:
    method: str
    url: str
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise HTTPStatusError(self.method, self.url, self.status_code)


class LoadClient:
    def __init__(self, connections: int, timeout: float = 60.0) -> None:
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "LoadClient":
        connector = aiohttp.TCPConnector(limit=self._connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Answer:
        assert self._session is not None, "use `async with LoadClient(...)`"
        limit = aiohttp.ClientTimeout(total=timeout) if timeout is not None else None
        async with self._session.request(method, url, json=json, headers=headers, timeout=limit) as response:
            return Answer(method, url, response.status, await response.read())

    async def get(self, url: str, **kwargs: Any) -> Answer:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Answer:
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> Answer:
        return await self.request("PUT", url, **kwargs)
