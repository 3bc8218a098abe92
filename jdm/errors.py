"""Errors the user can fix: the CLI prints their message (no traceback) and exits 2."""


class UserError(ValueError):
    """Bad input: the message names the value and what is allowed."""
