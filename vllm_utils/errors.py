"""The one exception type that reaches users as a single line (see the CLI)."""


class UserError(Exception):
    """Bad input or an unusable environment: the message names the problem and the fix."""
