"""The REST half of the client: JSON over HTTP(S) with the contract's errors."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cyphr.signing import is_loopback_origin, normalize_origin

# A request that fails before it reaches the server (no connection) is
# tried again, whatever its method: the server saw nothing. One that fails
# on the way back (a kept-alive connection dropped under it: a restarted
# proxy, a network change) is tried again only if it changes nothing: the
# server may have done it, and a second answer would say otherwise (a
# removed device "not found", a stored prekey "duplicate"). A message send
# carries its clientMessageId, and its caller resends it knowingly.
_RETRY = Retry(total=2, connect=2, read=1, status=0, other=0, redirect=0,
               allowed_methods=frozenset({"GET", "HEAD", "OPTIONS"}),
               raise_on_status=False)

# The environment variable that confirms turning TLS checks off: a flag
# alone is too easy to leave in a script or an alias (crypto review F9).
INSECURE_TLS_VARIABLE = "CYPHR_ALLOW_INSECURE_TLS"


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


def check_server(server: str, verify: bool | str = True) -> str:
    """The server URL without a trailing slash, if this client may talk to
    it: ``https://`` anywhere, ``http://`` only to a loopback host (over
    plain HTTP the session token travels in clear and anyone on the path is
    the server). ``verify=False`` (no TLS checks) only when
    CYPHR_ALLOW_INSECURE_TLS=1 confirms it. ClientError otherwise."""
    try:
        origin = normalize_origin(server)
    except ValueError as e:
        raise ClientError(f"{e}: give the server as https://host[:port]") from None
    if origin.startswith("http://") and not is_loopback_origin(origin):
        raise ClientError(f"refusing plain http:// to {origin}: it would send the session "
                          f"token in clear; use https:// (http:// is for localhost only)")
    if verify is False:
        allow_insecure_tls()
    return server.strip().rstrip("/")


def allow_insecure_tls() -> None:
    """ClientError unless CYPHR_ALLOW_INSECURE_TLS=1 confirms turning TLS
    certificate checks off."""
    if os.environ.get(INSECURE_TLS_VARIABLE) != "1":
        raise ClientError(f"refusing to skip the server's TLS certificate check: it lets anyone "
                          f"on the path be the server; set {INSECURE_TLS_VARIABLE}=1 to confirm "
                          f"(testing only)")


class Http:
    def __init__(self, server: str, timeout: float = 30.0, verify: bool | str = True) -> None:
        self.server = check_server(server, verify)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.verify = verify
        for scheme in ("https://", "http://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=_RETRY))
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
