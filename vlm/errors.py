"""The one exception type the CLI turns into a one-line message."""


class VLMError(Exception):
    """A problem with the user's input (file, field or value), explained in its message."""
