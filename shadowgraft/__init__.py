"""shadowgraft: compare checkpoints and graft fine-tuning deltas onto instruct models (Shadow-FT)."""

__version__ = "0.1.0"

from .checkpoint import Checkpoint  # noqa: E402
from .errors import ShadowgraftError  # noqa: E402
from .graft import apply  # noqa: E402
from .plan import plan_graft  # noqa: E402
from .stats import stats  # noqa: E402

__all__ = ["Checkpoint", "ShadowgraftError", "apply", "plan_graft", "stats", "__version__"]
