"""Cyphr's test suite: ``trial tests``."""

from cyphr.client import profile as _profile
from cyphr.handlers import security as _security

# Client profiles made by the tests seal their vault under a cheap Argon2id
# (1 pass over 8 MiB, not 3 over 64 MiB: about 10 ms, not 300). A profile's
# parameters are stored in its vault and read back at every unlock, so the
# code path is the one a person's profile takes; the tests' client
# processes get the same through tests/client_process.py.
_profile.OPSLIMIT, _profile.MEMLIMIT = 1, 8 * 1024 * 1024
# Likewise the server's Argon2id of POST /api/auth/hash-password (the hash
# names its parameters, so it verifies as any other).
_security.ARGON2_TIME_COST, _security.ARGON2_MEMORY_KIB = 1, 8 * 1024
