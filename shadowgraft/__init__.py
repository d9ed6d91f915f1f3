"""shadowgraft: compare checkpoints and graft fine-tuning deltas onto instruct models (Shadow-FT)."""

__version__ = "0.1.0"

from .checkpoint import Checkpoint  # noqa: E402  (no torch: headers and byte ranges only)
from .errors import ShadowgraftError  # noqa: E402

# apply / stats pull in torch (~1 s). They load on first use, so that
# `shadowgraft --help` is instant and Ctrl-C during start-up is handled by the
# CLI's own error path instead of interrupting a bare import.
_LAZY = {"apply": ("graft", "apply"), "plan_graft": ("plan", "plan_graft"), "stats": ("compare", "stats")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shadowgraft' has no attribute '{name}'")


__all__ = ["Checkpoint", "ShadowgraftError", "apply", "plan_graft", "stats", "__version__"]
