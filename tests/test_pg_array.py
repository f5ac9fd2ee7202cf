"""
cyphr.db.pg_array, the text of a PostgreSQL array that the stores pass for
their batch statements' array parameters (store_messages,
record_deliveries): exactly what array_in reads back, for any text.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cyphr.db import pg_array
from tests import postgres

# Any text PostgreSQL can hold: no NUL (it refuses one in text, whichever
# way it is sent), no lone surrogate (not UTF-8).
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_PROPERTY = settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


class TextTests(unittest.SynchronousTestCase):

    def test_quoting(self) -> None:
        """Every string is double-quoted with backslash and double quote
        escaped, so that separators, braces, spaces and the word NULL stay
        text; None is NULL; ints are written as they are; an empty list is
        the empty array."""
        self.assertEqual(
            pg_array(["a", 'b"c', "d\\e", None, "NULL", "", "{x,y}", " sp "]),
            '{"a","b\\"c","d\\\\e",NULL,"NULL","","{x,y}"," sp "}')
        self.assertEqual(pg_array([1, -2, None, 2**62]), "{1,-2,NULL,4611686018427387904}")
        self.assertEqual(pg_array([]), "{}")

    def test_other_types_refused(self) -> None:
        """A value of another type (bool, float, bytes) is refused rather
        than written as its repr."""
        for value in (True, 1.5, b"x"):
            with self.assertRaises(TypeError):
                pg_array([value])  # type: ignore[list-item]


class PostgresTests(unittest.SynchronousTestCase):
    """Read back by a real PostgreSQL: equal to what was written, and to
    what psycopg2's own adaptation of the list gives."""

    def setUp(self) -> None:
        import psycopg2

        self.conn = psycopg2.connect(postgres.shared_cluster().url("postgres"))
        self.conn.autocommit = True
        self.addCleanup(self.conn.close)

    def read_back(self, sql: str, *params: object) -> tuple[object, ...]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    @_PROPERTY
    @given(st.lists(st.one_of(st.none(), _TEXT), max_size=20))
    def test_text(self, values: list[str | None]) -> None:
        """Any strings (and NULLs) come back as they went."""
        ours, theirs = self.read_back("SELECT %s::text[], %s::text[]", pg_array(values), values)
        self.assertEqual(ours, values)
        self.assertEqual(theirs, values)

    @_PROPERTY
    @given(st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), max_size=20),
           st.lists(st.uuids(), max_size=5))
    def test_bigint_and_uuid(self, numbers: list[int | None], ids: list[uuid.UUID]) -> None:
        """Integers to the whole bigint range, NULLs and UUIDs (given as
        text, as the stores have them) come back as they went."""
        texts = [str(i) for i in ids]
        got = self.read_back("SELECT %s::bigint[], %s::uuid[]::text[]", pg_array(numbers),
                             pg_array(texts))
        self.assertEqual(got, (numbers, texts))

    def test_out_of_range_refused(self) -> None:
        """A number beyond bigint is an error of the statement, as it would
        be through psycopg2's own adaptation."""
        import psycopg2

        with self.assertRaises(psycopg2.DataError):
            self.read_back("SELECT %s::bigint[]", pg_array([2**63]))
