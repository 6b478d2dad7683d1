"""Translators from the older command lines and recipe formats to ordinary merge recipes."""
