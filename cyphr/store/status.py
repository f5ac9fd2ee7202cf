"""Queries about the database itself."""

from __future__ import annotations

from cyphr.db import Database, Transaction

# The migrations' own bookkeeping: its one row is reported as schemaVersion.
BOOKKEEPING_TABLES = frozenset({"schema_version"})


def _quote(name: str) -> str:
    """A table name from the catalog as an SQL identifier (both engines)."""
    return '"' + name.replace('"', '""') + '"'


async def _table_counts_txn(txn: Transaction, engine: str) -> dict[str, int]:
    if engine == "postgresql":
        # Tables of the schema in use; a partitioned table (messages) counts
        # once, through its parent, not again per partition.
        rows = await txn.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
            " AND NOT c.relispartition")
    else:
        rows = await txn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    names = sorted(name for (name,) in rows
                   if name not in BOOKKEEPING_TABLES and not name.startswith("sqlite_"))
    counts = {}
    for name in names:
        ((count,),) = await txn.execute(f"SELECT COUNT(*) FROM {_quote(name)}")
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
