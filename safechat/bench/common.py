"""Small helpers the benchmarks share: the prompt, resident memory, loading, Markdown tables."""
from __future__ import annotations

import inspect
import os
import re
import resource
import statistics
from typing import Any, Iterable
from runtime.model import load, Model

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
SPEED_THRESHOLD = 0.999999  # speed runs: no verdict intervenes, so every run has its full length
MB = 2 ** 20


# -- resident memory (Linux /proc; None elsewhere) -----------------------------------------
def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:  # not Linux: fall back to the peak, the best we have
        return process_peak_mb()


def process_peak_mb() -> float:
    """The process's peak RSS since it started, in MiB (getrusage; kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_since_reset_mb() -> float | None:
    """VmHWM in MiB: the peak RSS since the last `reset_peak()` (or since the start)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


# -- loading ----------------------------------------------------------------------------
def runtime_modes() -> list[bool | None]:
    """The runtime's decode-loop modes to compare: [True, False] (native C loop, Python loop)
    when `Model` takes `native=`, else [None] (the one mode there is)."""
    return [True, False] if "native" in inspect.signature(Model).parameters else [None]


def load_runtime(path, mode: bool | None = None, **kw):
    """runtime.load(path, **kw), with `native=mode` when the runtime has that switch."""
    if mode is not None:
        kw["native"] = mode
    return load(path, **kw)


def mode_label(mode: bool | None) -> str:
    return {True: " (native)", False: " (python)", None: ""}[mode]


# -- statistics and tables --------------------------------------------------------------
def median(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: Any, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
