"""One module per `shadowgraft` subcommand, each defining a click `command`."""
