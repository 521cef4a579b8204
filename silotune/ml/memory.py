"""Peak resident memory of a block of code, from the Linux kernel's own counters.

Python's tracemalloc does not see PyTorch's allocations; the kernel's peak-RSS mark
(``VmHWM`` in /proc/self/status) does. `PeakRSS` resets the mark on entry (writing 5 to
/proc/self/clear_refs) and reports the peak above the RSS at entry, i.e. the block's
working set. Freed memory that the C allocator keeps for re-use would hide a block's
allocations (they would re-use resident pages), so `PeakRSS` first collects garbage and
returns every free page to the kernel (glibc ``malloc_trim``); a block that runs after
larger ones is then measured as if it ran first. On systems without /proc the
measurement is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field}")


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: peak RSS above the start."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._start_kb: int | None = None

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        try:
            _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
            self._start_kb = _status_kb("VmRSS")
        except OSError:
            self._start_kb = None
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._start_kb is not None:
            try:
                self.bytes = 1024 * max(0, _status_kb("VmHWM") - self._start_kb)
            except OSError:
                self.bytes = None
