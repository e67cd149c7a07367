"""The one exception the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input or environment: printed as one line naming the fix, exit status 2."""
