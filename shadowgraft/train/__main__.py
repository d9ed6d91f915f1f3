"""``python -m shadowgraft.train`` / ``torchrun -m shadowgraft.train``: the ``shadowgraft train`` command."""

import sys

from ..cli import main
from ..heap import pause

if __name__ == "__main__":
    pause()
    main(["train", *sys.argv[1:]])
