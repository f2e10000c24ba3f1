"""This process's peak resident memory, from the Linux kernel (``/proc/self``): read it, and reset it."""

from __future__ import annotations

__all__ = ["peak_rss_bytes", "reset_peak_rss"]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS (Linux >= 4.0); False where
    not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set size (VmHWM) of this process since start or the last :func:`reset_peak_rss`; None where
    ``/proc/self/status`` cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
