"""``python -m shadowgraft ...`` runs the command line (same as the ``shadowgraft`` script)."""

from .cli import console

console()
