"""
Schema migrations: numbered SQL files in cyphr/db/schema/.

``NNN_name.sql`` serves both engines; ``NNN_name.postgres.sql`` and
``NNN_name.sqlite.sql`` are twins where the dialects differ. A one-row table
``schema_version`` holds the version of the database. At start every pending
file is applied in one transaction; a database newer than the code is
refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cyphr.db import SchemaTooNew, Transaction

SCHEMA_DIR = Path(__file__).parent / "schema"
ENGINES = ("postgresql", "sqlite")
_FILE_SUFFIX = {"postgresql": ".postgres.sql", "sqlite": ".sqlite.sql"}
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+?)(\.postgres|\.sqlite)?\.sql$")

# Any constant works, as long as nothing else in the database takes this
# advisory lock: it keeps two nodes starting at once from both migrating.
_POSTGRES_LOCK_ID = 0x637970687231


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    script: str


@lru_cache(maxsize=None)
def migrations(engine: str) -> tuple[Migration, ...]:
    """Every migration of ``engine``, in order. Versions run from 1 without
    gaps, each either shared or present as twins for both engines."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}")
    found: dict[int, dict[str, Path]] = {}
    for path in SCHEMA_DIR.iterdir():
        match = _NAME.match(path.name)
        if not match:
            continue
        kind = {".postgres": "postgresql", ".sqlite": "sqlite", None: "both"}[match.group(3)]
        found.setdefault(int(match.group(1)), {})[kind] = path
    result = []
    for expected, version in enumerate(sorted(found), start=1):
        if version != expected:
            raise RuntimeError(f"schema migration {expected:03d} is missing")
        files = found[version]
        if "both" in files and len(files) > 1:
            raise RuntimeError(f"schema migration {version:03d} is both shared and split")
        if "both" not in files and set(files) != set(ENGINES):
            raise RuntimeError(f"schema migration {version:03d} lacks a twin")
        path = files.get("both") or files[engine]
        name = _NAME.match(path.name).group(2)  # type: ignore[union-attr]
        result.append(Migration(version, name, path.read_text(encoding="utf-8")))
    return tuple(result)


def latest_version(engine: str = "sqlite") -> int:
    return len(migrations(engine))


def check_version(version: int, engine: str) -> None:
    latest = latest_version(engine)
    if version > latest:
        raise SchemaTooNew(
            f"the database has schema version {version}, but this version of "
            f"Cyphr knows only up to {latest}: it was written by a newer Cyphr. "
            "Run that newer version (or restore a backup); nothing was changed."
        )


async def migrate_txn(txn: Transaction, engine: str, target: int | None = None) -> int:
    """Bring the schema to ``target`` (default: the latest) inside the
    caller's transaction. Answers the version reached."""
    if engine == "postgresql":
        await txn.execute("SELECT pg_advisory_xact_lock(?)", (_POSTGRES_LOCK_ID,))
    await txn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " id INTEGER PRIMARY KEY CHECK (id = 1),"
        " version INTEGER NOT NULL)"
    )
    rows = await txn.execute("SELECT version FROM schema_version WHERE id = 1")
    current = rows[0][0] if rows else 0
    check_version(current, engine)
    wanted = latest_version(engine) if target is None else target
    pending = [m for m in migrations(engine) if current < m.version <= wanted]
    for migration in pending:
        await txn.execute_script(migration.script)
    if pending:
        reached = pending[-1].version
        if rows:
            await txn.execute("UPDATE schema_version SET version = ? WHERE id = 1", (reached,))
        else:
            await txn.execute("INSERT INTO schema_version (id, version) VALUES (1, ?)", (reached,))
        return reached
    return current


async def dump_schema(database: Any) -> list[tuple[Any, ...]]:
    """A comparable description of every table, column, index and
    constraint, to check that databases reached by different paths agree."""
    if database.engine == "sqlite":
        return await database.run_query(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        )
    columns = await database.run_query(
        "SELECT 'column', table_name, column_name, data_type, is_nullable,"
        " column_default, collation_name"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, column_name"
    )
    indexes = await database.run_query(
        "SELECT 'index', tablename, indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'public' ORDER BY tablename, indexname"
    )
    constraints = await database.run_query(
        "SELECT 'constraint', c.conrelid::regclass::text, c.conname,"
        " pg_get_constraintdef(c.oid)"
        " FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = 'public' ORDER BY 2, 3"
    )
    partitions = await database.run_query(
        "SELECT 'partition', c.relname, pg_get_expr(c.relpartbound, c.oid)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relispartition ORDER BY 2"
    )
    return columns + indexes + constraints + partitions
