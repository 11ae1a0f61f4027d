"""Command-line pieces the benches share."""

import argparse
import os


def available_cores() -> int:
    """The CPU cores this process may run on; Ray actors and worker processes it starts inherit the same."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type for counts: zero repeats, requests, seeds or cores would divide by zero or do nothing."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
