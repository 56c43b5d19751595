"""Errors that a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what is wrong and what to run."""
