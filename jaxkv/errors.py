"""One exception type for every mistake a user can make, so the CLI can print it as one line."""


class JaxkvError(Exception):
    """Bad input or an unusable checkpoint: the message alone tells the user what to fix."""
