"""
A migrated SQLite database, made once per test process and copied per test.

Every test server would otherwise migrate a fresh file through every schema
file (about 12 ms, some 600 times a run). The template is migrated by the
server's own engine (cyphr.db.sqlite, so its pragmas and its migration
code) and closed cleanly, which folds its write-ahead log into the file:
a copy of that one file is a database at the code's schema version with
no rows but schema_version. No secret fingerprints are in it: the first
server to start on a copy records its own, as on a new database.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from cyphr.db import sqlite

FILE_NAME = "cyphr.sqlite3"  # where a server looks in its data directory

_template: str | None = None


def _migrate(path: str) -> None:
    """Open, migrate and close ``path`` with the server's SQLite engine,
    its work run at once on this thread (its test switch)."""
    fatal: list[str] = []
    database = sqlite.SQLiteDatabase(path, reactor, on_fatal=fatal.append)
    previous = sqlite.run_inline_for_tests(True)
    try:
        database.start()
        closed = Deferred.fromCoroutine(database.close())
    finally:
        sqlite.run_inline_for_tests(previous)
    failures: list[object] = []
    closed.addErrback(failures.append)
    if fatal or failures or not closed.called or database.schema_version is None:
        raise RuntimeError(f"migrating the SQLite template failed: {fatal} {failures}")


def template() -> str:
    """The path of this process's migrated template (made on first use)."""
    global _template
    if _template is None:
        directory = tempfile.mkdtemp(prefix="cyphr-sqlite-template-")
        atexit.register(shutil.rmtree, directory, True)
        path = os.path.join(directory, FILE_NAME)
        _migrate(path)
        _template = path
    return _template


def migrated_data_dir(directory: str) -> str:
    """Make ``directory`` (mode 0700, as a server makes it) a data
    directory whose database is a copy of the template; answers it."""
    os.makedirs(directory, mode=0o700)
    shutil.copyfile(template(), os.path.join(directory, FILE_NAME))
    return directory
