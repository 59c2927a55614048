"""The one exception type for mistakes a user can make (bad config, missing data, ...)."""


class UserError(Exception):
    """A problem caused by the user's input, with a message that names the problem and the fix.

    Top-level scripts print it as a single paragraph (no traceback) and exit with code 2.
    """
