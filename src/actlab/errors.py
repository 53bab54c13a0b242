"""Exceptions the entry points turn into one line: mistakes a user can fix, and divergence."""


class UserError(Exception):
    """Printed as one line by the entry points (no traceback); the message says what to do."""


class Diverged(UserError):
    """The training loss became NaN or infinite: the run stops and is recorded as `diverged`."""
