"""The one exception type front ends turn into a clean message (CLI: exit 2; API: 400)."""


class VlchatError(ValueError):
    """A problem the user can fix: bad input, a missing package, a bad parameter.

    The message is one line, says what is wrong and, where there is one, the fix.
    """
