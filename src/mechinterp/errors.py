"""The one exception type for problems a user can fix (bad config, missing or corrupt input)."""


class UserError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""
