"""``python -m shadowgraft.train`` / ``torchrun -m shadowgraft.train``: the ``shadowgraft train`` command."""

import sys

from ..cli import console

if __name__ == "__main__":
    console(["train", *sys.argv[1:]])
