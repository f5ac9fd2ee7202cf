"""Cyphr's test suite: ``trial tests``."""

import compileall
import functools
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

# Where Python is told not to write its bytecode caches
# (PYTHONDONTWRITEBYTECODE, as on the machines that run this suite), every
# Python process the suite starts (twistd, cyphr-admin, the command-line
# client: some fifty of them) would compile the whole of cyphr from source
# before doing anything: 0.25 s of the 0.55 s that importing cyphr.server
# takes. The caches are written here, once per run (a check of each file's
# time stamp once they are current), and read by every process after.
if sys.dont_write_bytecode:
    _ROOT = Path(__file__).resolve().parent.parent
    for _package in ("cyphr", "tests"):
        compileall.compile_dir(_ROOT / _package, quiet=2)

from cyphr.blobs import local as _local_blobs
from cyphr.client import crypto as _crypto
from cyphr.client import localstore as _localstore
from cyphr.client import profile as _profile
from cyphr.db import sqlite as _sqlite
from cyphr.handlers import security as _security

T = TypeVar("T")

# Client profiles made by the tests seal their vault under a cheap Argon2id
# (1 pass over 64 KiB, not 3 over 64 MiB: a tenth of a millisecond, not 300;
# a vault is unlocked several times in most client tests). A profile's
# parameters are stored in its vault and read back at every unlock, so the
# code path is the one a person's profile takes; the tests' client
# processes get the same through tests/client_process.py.
_profile.OPSLIMIT, _profile.MEMLIMIT = 1, 64 * 1024
# Likewise the server's Argon2id of POST /api/auth/hash-password (the hash
# names its parameters, so it verifies as any other).
_security.ARGON2_TIME_COST, _security.ARGON2_MEMORY_KIB = 1, 8 * 1024

# The tests' profiles, local stores, servers' SQLite databases and blobs
# are written as in production, but not waited on until they reach the disk
# (fsync): they go with the test run, and a power cut is not what any test
# makes. A profile save is four fsyncs, a server's SQLite commit one, and
# the suite makes thousands of each. (A killed process loses nothing either
# way.) What production uses, for the test that checks the server's:
SQLITE_SYNCHRONOUS = _sqlite.SYNCHRONOUS
_sqlite.SYNCHRONOUS = "NORMAL"
_profile.SYNC_WRITES = False
_localstore.SYNCHRONOUS = "NORMAL"
_local_blobs.SYNC = False


def _remembered(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, answering again what it answered before for the same
    arguments: for pure functions, costly by design, that the tests call
    over and over with the same arguments. Each first answer is the
    function's own."""
    answers: dict[str, T] = {}

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> T:
        # The arguments are text, bytes and lists of text: repr tells them apart.
        key = repr((args, sorted(kwargs.items())))
        if key not in answers:
            answers[key] = function(*args, **kwargs)
        return answers[key]
    return call


# zxcvbn's estimate of a new profile's passphrase (some 10 ms for the
# suite's usual one, at each of hundreds of profiles made) and the safety
# number of two identity keys (5,200 SHA-512 rounds a side, by design): each
# is a pure function of its arguments, so the suite computes each distinct
# one once. Passphrases the tests vary are estimated as before.
_profile.zxcvbn = _remembered(_profile.zxcvbn)
_crypto.safety_number = _remembered(_crypto.safety_number)
