"""srfx: exact structural minimization of pruned PyTorch networks (Squeeze-Release).

    >>> import srfx
    >>> small = srfx.compress(model, example_input)      # doctest: +SKIP
    >>> print(small.meta["srfx_report"])                   # doctest: +SKIP
"""
from .api import REPORT_KEY, analyze, compress, plan
from .backend import Backend  # torch.compile(model, backend="srfx") or backend=srfx.Backend()
from .coupling import Coupling, Group, coupling_groups
from .errors import InputError, RewriteError, SrfxError, TraceError, VerificationError
from .planning import Plan, plan_removal
from .report import Report
from .tracing import trace

__all__ = [
    "compress", "analyze", "plan", "trace", "coupling_groups", "plan_removal",
    "Coupling", "Group", "Plan", "Report", "REPORT_KEY", "Backend",
    "SrfxError", "TraceError", "InputError", "VerificationError", "RewriteError",
]
__version__ = "0.1.0"

# Submodules the README reaches through the package (``srfx.cycle.SqueezeRelease``), imported on
# first use: ``import srfx`` stays light, and ``srfx.cycle`` works without its own import line.
_LAZY_SUBMODULES = frozenset({"cycle", "group_pruning", "passes", "pruners", "supervised", "compensated_ln", "testing", "models"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
