"""
Heap snapshots on demand, for benchmarks/soak.py --trace: put this directory
first on a server's PYTHONPATH with CYPHR_TRACE_SNAPSHOTS=<directory>, and
each SIGUSR2 writes a tracemalloc snapshot to <directory>/<n>.snapshot
(CYPHR_TRACE_FRAMES frames per allocation, 8 by default). Without that
variable this module does nothing.
"""

import os

_where = os.environ.get("CYPHR_TRACE_SNAPSHOTS")

if _where:
    import signal
    import tracemalloc

    tracemalloc.start(int(os.environ.get("CYPHR_TRACE_FRAMES", "8")))
    _taken = [0]

    def _snapshot(signum, frame):  # type: ignore[no-untyped-def]
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        path = os.path.join(_where, f"{_taken[0]}.snapshot")
        snapshot.dump(path + ".part")
        os.rename(path + ".part", path)  # whole or absent, for the reader
        _taken[0] += 1

    signal.signal(signal.SIGUSR2, _snapshot)
