"""The REST half of the client: JSON over HTTP(S) with the contract's errors."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests


class ClientError(Exception):
    """Something the user should be told in one line."""


class ApiError(ClientError):
    """The server said no, in the contract's format."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class Http:
    def __init__(self, server: str, timeout: float = 30.0, verify: bool | str = True) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.verify = verify
        self.token: str | None = None

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if auth:
            if self.token is None:
                raise ClientError("not logged in (run `cyphr-client login`)")
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self.session.request(method, self.server + path, json=body, params=params,
                                            headers=headers, timeout=self.timeout)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach {self.server}: {type(e).__name__}") from None
        try:
            status, retry = response.status_code, response.headers.get("Retry-After")
            try:
                answer = response.json()
            except ValueError:
                answer = None
        finally:
            # Back to the pool now, not when an exception's traceback that
            # holds this frame is collected.
            response.close()
            del response
        if 200 <= status < 300 and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and isinstance(answer.get("code"), str):
            raise ApiError(status, answer["code"], str(answer.get("error", "")),
                           answer.get("details"), float(retry) if retry and retry.isdigit() else None)
        raise ClientError(f"{self.server} answered {status} without a Cyphr answer "
                          f"(is this a Cyphr server?)")


def segment(value: str) -> str:
    """One path segment, escaped."""
    return quote(value, safe="")
