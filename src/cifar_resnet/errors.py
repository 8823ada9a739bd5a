"""The one user-facing error type, at the bottom of the package so that every layer
can raise it and only the entry points catch it.

A ``UserError``'s message alone tells the user what to fix; the stages print it as
one line on stderr and exit with code 2, with no traceback.
"""


class UserError(Exception):
    """An input the user can fix (a config value, a data folder, a model URI, ...)."""
