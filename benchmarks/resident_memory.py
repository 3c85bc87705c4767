"""Resident-set readings for the CPU benchmarks (Linux /proc), shared by bench_logprobs.py and
bench_step.py."""

from __future__ import annotations


def rss_bytes(field: str) -> int:
    """A /proc/self/status size in bytes: "VmRSS" (now) or "VmHWM" (peak since the reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Resets VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
