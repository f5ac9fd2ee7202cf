"""
The secrets every node on one database must share, checked at start.

The first server to start on a database records a fingerprint of each of
its jwt_secret, fingerprint_key, totp_key and push_vapid_key (table
secret_fingerprints; a secret added later is recorded by the first start
that knows it);
each later start compares its own, in the transaction that migrates the
schema, and a node whose secrets differ is refused before it serves.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping

from cyphr.db import Transaction, UnusableDatabase

# The order in which a refusal names them.
FINGERPRINTED = ("jwt_secret", "fingerprint_key", "totp_key", "push_vapid_key")
# Their environment variables, for the refusal's advice.
_VARIABLES = {name: "CYPHR_" + name.upper() for name in FINGERPRINTED}


class SecretsDiffer(UnusableDatabase):
    """This node's secrets are not those the database was first started with."""

    def __init__(self, message: str, names: tuple[str, ...]) -> None:
        super().__init__(message)
        self.names = names


def secret_fingerprint(name: str, key: bytes) -> str:
    """A fingerprint of secret ``name``: the HMAC-SHA256, keyed by the
    secret, of a fixed label. Equal secrets give equal fingerprints; the
    secret cannot be recovered from it (that would break HMAC)."""
    label = b"cyphr secret fingerprint v1 " + name.encode("ascii")
    return hmac.new(key, label, hashlib.sha256).hexdigest()


def refusal(names: tuple[str, ...], generated: tuple[str, ...]) -> str:
    """The one line that says which settings differ and what to do."""
    differ = " and ".join(names)
    line = (f"{differ} {'differs' if len(names) == 1 else 'differ'} from the one the database "
            "was first started with (its fingerprint in secret_fingerprints does not match): "
            "every node on one database must have the same jwt_secret, fingerprint_key, "
            "totp_key and push_vapid_key. Refusing to start.")
    from_data_dir = [name for name in names if name in generated]
    if from_data_dir:
        line += (f" This node's {' and '.join(from_data_dir)} "
                 f"{'was' if len(from_data_dir) == 1 else 'were'} generated in its own data "
                 "directory: for a cluster, set the secrets in the configuration "
                 f"({', '.join(_VARIABLES[name] for name in from_data_dir)} or the config "
                 "file), the same on every node.")
    else:
        line += (" To rotate a secret on purpose, stop every node and delete its row from "
                 "secret_fingerprints first.")
    return line


async def check_fingerprints_txn(txn: Transaction, fingerprints: Mapping[str, str],
                                 now_ms: int, generated: tuple[str, ...] = ()) -> None:
    """Record each fingerprint the database does not hold yet, and raise
    SecretsDiffer if one it holds differs. Run in the migration's
    transaction: on PostgreSQL its advisory lock (and the primary key) make
    two first starts agree on whose secrets are recorded."""
    differ = []
    for name in FINGERPRINTED:
        if name not in fingerprints:
            continue
        await txn.execute(
            "INSERT INTO secret_fingerprints (name, fingerprint, recorded_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, fingerprints[name], now_ms))
        rows = await txn.execute("SELECT fingerprint FROM secret_fingerprints WHERE name = ?", (name,))
        if not hmac.compare_digest(rows[0][0], fingerprints[name]):
            differ.append(name)
    if differ:
        raise SecretsDiffer(refusal(tuple(differ), generated), tuple(differ))
