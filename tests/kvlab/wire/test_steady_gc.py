"""Servers keep CPython's full garbage-collection passes off the serving path (kvlab.wire.http_server)."""
import subprocess
import sys

CHILD = """
import gc
from kvlab.wire.http_server import FULL_GC_EVERY, steady_gc
before = gc.get_threshold()
steady_gc()
after = gc.get_threshold()
assert after == (before[0], before[1], FULL_GC_EVERY), (before, after)
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()   # start-up objects left out of every pass
class Cycle:
    pass
a = Cycle(); a.me = a; del a
assert gc.collect() >= 1   # cyclic garbage is still found, once a pass runs
print("ok")
"""


def test_steady_gc_freezes_start_up_objects_and_spaces_full_passes():
    # In a child process: the setting is process-wide, and the test process's own collector stays as is.
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
