"""The harness's errors, in a module of their own: the suite builder raises them and so do the
tasks it builds (`hub_mc_ll` offline), and neither may import the other for them."""

from __future__ import annotations


class SuiteError(ValueError):
    """A malformed benchmarks config, an unknown suite, or a task that cannot be built."""


class TaskUnavailable(SuiteError):
    """A well-formed entry that cannot run on this machine (no inspect_evals, no hub access):
    the runner skips it with this message and runs the rest of the suite."""
