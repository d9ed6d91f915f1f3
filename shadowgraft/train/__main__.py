"""``python -m shadowgraft.train`` / ``torchrun -m shadowgraft.train``: the ``shadowgraft train`` command."""

import sys

from ..cli import main
from ..commands._common import pause_gc

if __name__ == "__main__":
    pause_gc()
    main(["train", *sys.argv[1:]])
