"""
``python -m tests.client_process ARGS`` runs ``cyphr-client ARGS`` as the
tests' client processes do: the same entry point (cyphr.client.cli.main),
with the cheap vault key derivation that tests/__init__.py sets for new
profiles.

SIGUSR1 writes every thread's stack to stderr (``faulthandler``), so a
test that finds a client process hung can say where it hangs
(``tests.helpers.finish``).

SIGINT is Ctrl-C, as at a terminal: a test stands for a person there. A
test run started in the background (as CI may start it) has SIGINT
ignored, and hands that on to its children (POSIX: a non-interactive
shell's asynchronous commands ignore SIGINT); a child also inherits the
signal mask of the thread that started it, where SIGINT may be blocked.
Python keeps either, and a listen would never hear its Ctrl-C: both are
undone here.
"""

import faulthandler
import signal
import sys

import tests  # noqa: F401  (the cheap Argon2 parameters for new profiles)
from cyphr.client.cli import main

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
