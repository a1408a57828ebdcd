"""The one error type the command line turns into a one-line message and exit code 2, and the
command line's other exit codes."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input (a flag, a file, a model, an output path): printed as one line, exit code 2.
    `field` names the run-config field (and so the flag) when one value is to blame."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def exc_summary(exc: BaseException, limit: int = 160) -> str:
    """An exception in one short line for an error message: its type and the first line of its
    message (at most `limit` characters), or its type alone when it has none."""
    text = str(exc).strip()
    first = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}{': ' + first if first else ''}"


LATENCY_MISSED = 3  # exit code: the run is whole and reported, but its latency target was
# missed by more than --latency-tolerance (--accept-latency-miss exits 0)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: CUDA out of memory, the CPU allocator
    refusing, MemoryError."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def out_of_memory_line(exc: BaseException, distilling: bool = False) -> str | None:
    """One line for an allocation that failed (:func:`is_out_of_memory`), naming the flags
    that size what a run holds in memory; None for any other error."""
    if not is_out_of_memory(exc):
        return None
    flags = ["--batch-size (calibration and evaluation batches)",
             "--calib-size (calibration inputs, whose activations the refits read)",
             "--latency-batch-size (timing)"] + (["--distill-batch-size"] if distilling else [])
    return (f"out of memory ({exc_summary(exc)}); nothing half-written was kept: lower "
            f"{', '.join(flags)}, or run where there is more memory")
