"""--log-format json: one JSON object per line."""

from __future__ import annotations

import io
import json

from twisted.application.service import Application
from twisted.internet import reactor
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.trial.unittest import TestCase

from cyphr.cpu import CpuPool
from cyphr.logs import JsonLogObserver
from cyphr.realtime.engine import EngineServer
from cyphr.server import CyphrService
from tests.helpers import make_config


def engine() -> EngineServer:
    return EngineServer(reactor, on_session=lambda session: None)  # type: ignore[arg-type,return-value]


class JsonLogTests(TestCase):
    def log(self) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        publisher = LogPublisher(JsonLogObserver(out))
        return Logger(namespace="cyphr.test", observer=publisher), out

    def test_fields(self) -> None:
        """A line holds time, level, namespace, the formatted message and the event's fields."""
        log, out = self.log()
        log.warn("Pool of {size} is {state}", size=4, state="down")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "cyphr.test")
        self.assertEqual(record["message"], "Pool of 4 is down")
        self.assertEqual((record["size"], record["state"]), (4, "down"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_failure_traceback(self) -> None:
        """A logged failure carries its traceback."""
        log, out = self.log()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("Dividing went wrong")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_one_line_per_event(self) -> None:
        """Messages with newlines still make one line each; values that are not JSON are repr'd."""
        log, out = self.log()
        log.info("two\nlines", thing=object())
        log.info("second")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("object", json.loads(lines[0])["thing"])

    def test_twistd_takes_the_observer(self) -> None:
        """With --log-format json the service gives twistd's application a JSON observer."""
        application = Application("cyphr")
        CyphrService(make_config(self, log_format="json"), CpuPool(reactor), engine(), reactor).setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), JsonLogObserver)

    def test_text_keeps_twistd_logging(self) -> None:
        """With text logs twistd's own observer is left in place."""
        application = Application("cyphr")
        CyphrService(make_config(self), CpuPool(reactor), engine(), reactor).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))
