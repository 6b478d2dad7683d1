"""Command-line entry points: thin translators to ``run_merge``."""
