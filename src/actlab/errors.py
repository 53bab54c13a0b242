"""The one exception type for mistakes a user can fix: it carries the message that says how."""


class UserError(Exception):
    """Printed as one line by the entry points (no traceback); the message says what to do."""
