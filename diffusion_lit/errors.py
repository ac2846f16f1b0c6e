"""The one exception type for a user's mistake."""


class UserError(ValueError):
    """Bad input from the user (config value, missing data, unreadable checkpoint).

    The CLI prints its message, which says what is wrong and how to fix it, and exits non-zero without a traceback.
    """
