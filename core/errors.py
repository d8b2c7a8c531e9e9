"""The one error type the command line turns into a one-line message."""


class HearthError(Exception):
    """A problem a user can act on. Its message is one line that names the file, field or thing."""
