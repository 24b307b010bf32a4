"""What the providers of every benchmark share: the status of one that cannot run a case, and
the settings under which the compiling providers compile."""
from __future__ import annotations


class Unavailable(Exception):
    """A provider that cannot run this case (status already chosen: "n/a", "skipped",
    "unavailable"); the run goes on and reports ``status: reason``."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def compile_settings():
    """torch._dynamo, with room for the recompilations of a whole grid of cases (each case is
    compiled once, after ``torch._dynamo.reset()``)."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch._dynamo
