"""``python -m shadowgraft.train`` / ``torchrun -m shadowgraft.train``: the ``shadowgraft train`` command."""

import sys

from ..cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
