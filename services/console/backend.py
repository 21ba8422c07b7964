"""The three services, called with the signed-in person's token: the console sees
exactly what that person may see, and every read is audited by the service that owns
the record."""

from typing import Any

import httpx

from shared.settings import SERVICES, ServiceName, Settings


class BackendError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Backend:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.urls: dict[ServiceName, str] = {s: settings.base_url(s) for s in SERVICES}
        self.http = httpx.AsyncClient(timeout=10.0, transport=transport)

    async def close(self) -> None:
        await self.http.aclose()

    async def call(
        self, service: ServiceName, method: str, path: str, token: str, *, json: Any = None, params: Any = None
    ) -> Any:
        try:
            answer = await self.http.request(
                method,
                self.urls[service] + path,
                json=json,
                params=params,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.TransportError as exc:
            raise BackendError(503, f"the {service} service is not reachable") from exc
        if answer.status_code >= 400:
            try:
                message = str(answer.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = answer.reason_phrase
            raise BackendError(answer.status_code, message)
        return answer.json() if answer.content else None
