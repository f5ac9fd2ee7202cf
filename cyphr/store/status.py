"""Queries about the database itself."""

from __future__ import annotations

from typing import Iterable

from cyphr.db import Database, Transaction

# The migrations' own bookkeeping: its one row is reported as schemaVersion.
BOOKKEEPING_TABLES = frozenset({"schema_version"})


# The tables of the schema in use, from each engine's catalog. On
# PostgreSQL a partitioned table (messages) is listed once, through its
# parent, not again per partition.
TABLES_SQL = {
    "postgresql": (
        "SELECT c.relname FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
        " AND NOT c.relispartition"),
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
}


def counted_tables(names: Iterable[str]) -> list[str]:
    """The tables whose rows are counted: not the engine's own nor the
    migrations' bookkeeping."""
    return sorted(name for name in names
                  if name not in BOOKKEEPING_TABLES and not name.startswith("sqlite_"))


def count_sql(table: str) -> str:
    """COUNT(*) of a table named by the catalog (identifiers cannot be
    parameters: the name is quoted, on both engines)."""
    return 'SELECT COUNT(*) FROM "' + table.replace('"', '""') + '"'


async def _table_counts_txn(txn: Transaction, engine: str) -> dict[str, int]:
    names = counted_tables(name for (name,) in await txn.execute(TABLES_SQL[engine]))
    counts = {}
    for name in names:
        ((count,),) = await txn.execute(count_sql(name))
        counts[name] = int(count)
    return counts


class StatusStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    @property
    def engine(self) -> str:
        return self._db.engine

    @property
    def schema_version(self) -> int | None:
        return self._db.schema_version

    async def ping(self) -> None:
        """One round trip to the database."""
        await self._db.run_query("SELECT 1")

    async def table_counts(self) -> dict[str, int]:
        """The number of rows of every table of the schema, read from the
        catalog at the time of asking (so a new table is counted without
        being named here), in one transaction."""
        return await self._db.run_interaction("table_counts", _table_counts_txn, self._db.engine)
