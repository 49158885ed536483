"""The line every benchmark prints first: when, and on what, its figures were measured.

A figure means nothing without its date and machine, and on a shared machine
the load average before a run moves every figure, so it is printed too.
"""

from __future__ import annotations

import datetime
import os
import platform


def run_header(details: str = "") -> str:
    """Date and time (UTC), host name, architecture, CPU count and 1-minute load average, then `details`."""
    line = (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return f"{line}, {details}" if details else line
