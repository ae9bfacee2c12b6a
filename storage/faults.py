"""Named crash points, so the reliability suite can kill a stage exactly where it hurts most.

`REFLOW_KILL_AT=<point>[@<n>]` makes the process SIGKILL itself the n-th time (default: first) it
reaches `<point>`; unset, a crash point costs one dictionary lookup. The points sit where an
interruption is most dangerous: after a training step, inside a checkpoint write (new file complete,
not yet renamed), after a shard's data is on disk but before progress records it, and between the two
renames that put a finished output directory in place. SIGKILL, not an exception: nothing gets to
clean up, as with the OOM killer or a power cut.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "REFLOW_KILL_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process here if `REFLOW_KILL_AT` names this point (and this is its n-th visit)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
