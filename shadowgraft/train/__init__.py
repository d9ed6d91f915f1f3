"""Fine-tune the base model (optional extra: ``pip install shadowgraft[train]``).

``torchrun --nproc-per-node N -m shadowgraft.train ...`` takes the flags of ``shadowgraft train``.
"""

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
