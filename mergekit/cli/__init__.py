"""Command-line entry points: thin translators to ``run_merge``.

Importing this package (every command's module does, first) hands SIGINT and SIGTERM to
``interrupts`` for the rest of the process: these are programs, not a library."""

from mergekit.cli.interrupts import take_signals

take_signals()
