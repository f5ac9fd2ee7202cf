"""
Which server origins a signed statement may name: the one rule shared by
login statements (cyphr.handlers.identity) and wallet links
(cyphr.handlers.wallet).

A client signs the origin it reached (``signing.normalize_origin`` of the
URL it was given), so a signature made for one server is worthless at
another. With ``public_url`` set, exactly those origins are accepted; with
none set, any loopback origin, so that a server tried out on localhost works
without configuration (and nothing signed for a real host is accepted).
"""

from __future__ import annotations

from cyphr.signing import is_loopback_origin, normalize_origin


# Answers kept for the origins seen last (clients name the same few): parsing
# a URL costs more than the rest of a statement's checks. Bounded, since the
# strings come from clients.
_CACHE_SIZE = 64


class AcceptedOrigins:
    def __init__(self, public_urls: tuple[str, ...] = ()) -> None:
        # Normalised again here, so that the rule holds whatever a caller passes.
        self._origins = tuple(normalize_origin(url) for url in public_urls)
        self._answers: dict[str, bool] = {}

    @property
    def configured(self) -> tuple[str, ...]:
        return self._origins

    def accepts(self, origin: str) -> bool:
        """Whether a statement naming ``origin`` was made for this server. The
        origin must be in its normalised spelling: it is compared as signed."""
        answer = self._answers.get(origin)
        if answer is None:
            if len(self._answers) >= _CACHE_SIZE:
                self._answers.clear()
            answer = self._answers[origin] = self._accepts(origin)
        return answer

    def _accepts(self, origin: str) -> bool:
        try:
            if normalize_origin(origin) != origin:
                return False
        except ValueError:
            return False
        if self._origins:
            return origin in self._origins
        return is_loopback_origin(origin)

    def describe(self) -> str:
        """What is accepted, for an error's details (nothing secret)."""
        if self._origins:
            return ", ".join(self._origins)
        return "a loopback origin (public_url is not set)"
