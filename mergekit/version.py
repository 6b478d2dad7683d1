"""mergekit's version (pyproject.toml gives the same), recorded in every manifest."""

__version__ = "0.2.0.dev0"
