"""Exceptions shared by the library and the CLI (kept here so neither imports the other)."""


class UsageError(Exception):
    """A user mistake the CLI reports in one line (bad option, bad file, refused input)."""
