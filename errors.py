"""The one exception the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input or environment: printed as one line naming the fix, exit status 2. `everywhere`: raised
    alike by every process of a torchrun run (a bad flag, a stop they agreed on), so rank 0 alone prints it."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere
