"""
``python -m tests.client_process ARGS`` runs ``cyphr-client ARGS`` as the
tests' client processes do: the same entry point (cyphr.client.cli.main),
with the cheap vault key derivation that tests/__init__.py sets for new
profiles.
"""

import sys

import tests  # noqa: F401  (the cheap Argon2 parameters for new profiles)
from cyphr.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
