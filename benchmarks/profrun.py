"""cProfile a module's run and write the stats even when a time limit stops it (SIGTERM, as `timeout` sends).

  timeout 300 python benchmarks/profrun.py OUT.prof -m gerelion_dask.cli classify --i ... --o ...
  python -c "import pstats; pstats.Stats('OUT.prof').sort_stats('cumtime').print_stats(40)"

``python -m cProfile`` writes nothing when killed, which loses the profile of exactly the runs that were too slow.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: profrun.py OUT.prof -m MODULE [ARGS...]")
    out, mod, args = sys.argv[1], sys.argv[3], sys.argv[4:]

    def stop(*_):
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = [mod, *args]
    sys.path.insert(0, os.getcwd())  # as python -m does
    prof = cProfile.Profile()
    prof.enable()
    try:
        runpy.run_module(mod, run_name="__main__")
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
