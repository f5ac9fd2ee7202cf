"""
``GET /metrics``: the Prometheus exposition (cyphr.metrics), on the public
endpoints, or only on the ``--metrics-listen`` ones when there are some.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web import resource

from cyphr.api.http import error_answer
from cyphr.errors import MethodNotAllowed, NotFound
from cyphr.metrics import Metrics


class MetricsResource(resource.Resource):
    """``GET /metrics``: the exposition, for Prometheus."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.route = "/metrics"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.exposition()

    def render(self, request: Any) -> Any:
        request.route = "/metrics"
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return error_answer(request, MethodNotAllowed())
        return super().render(request)


class MetricsRoot(resource.Resource):
    """The root of a ``--metrics-listen`` site: ``/metrics`` and nothing else."""

    def __init__(self, metrics: MetricsResource) -> None:
        super().__init__()
        self._metrics = metrics

    def getChildWithDefault(self, name: bytes, request: Any) -> resource.Resource:
        if name == b"metrics" and not request.postpath:
            return self._metrics
        return self  # walks to the end of the path, then answers 404

    def render(self, request: Any) -> bytes:
        return error_answer(request, NotFound())
