"""Threads, open file descriptors and peak memory of a running process, from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Resources:
    threads: int
    fds: int

    def within(self, baseline: Resources, threads: int = 0, fds: int = 0) -> bool:
        """No more than `baseline` plus the given slack."""
        return self.threads <= baseline.threads + threads and self.fds <= baseline.fds + fds


def resources(pid: int) -> Resources:
    return Resources(len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")))


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set size of the process so far."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def peak_rss_with_children_mb(pid: int) -> float:
    """Peak RSS of the process plus that of each live child (the node's job workers): an upper bound
    of what they held together, since their peaks need not coincide."""
    total = peak_rss_mb(pid)
    for child in psutil.Process(pid).children():
        try:
            total += peak_rss_mb(child.pid)
        except (FileNotFoundError, RuntimeError):  # exited meanwhile, or a zombie without memory
            continue
    return total
