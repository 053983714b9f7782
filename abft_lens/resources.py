"""What a piece of work cost this process: wall time and peak resident memory (Linux ``/proc``; elsewhere None).

The peak (``VmHWM``) is the process's high-water mark; :func:`reset_peak_rss` lowers it to the current RSS
(``/proc/self/clear_refs`` value 5), so the peak read after a piece of work is that work's own.

    from abft_lens.resources import peak_rss_mib, reset_peak_rss

    reset_peak_rss()
    ...                        # the work
    peak = peak_rss_mib()      # MiB, or None where /proc is not there
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["peak_rss_mib", "reset_peak_rss"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mib() -> float | None:
    """This process's peak resident set size since it started or since :func:`reset_peak_rss`, in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Lower the peak RSS mark to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
