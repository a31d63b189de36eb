"""Subcommands of the ``engine`` CLI that belong to the engine itself."""
