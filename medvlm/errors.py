"""The errors a user can cause. Each message is one sentence: what was wrong and what to do."""


class UserInputError(ValueError):
    """Something the user gave us is wrong; the CLI exits with status 2, the app shows the message."""


class VolumeError(UserInputError):
    """A scan that cannot be read."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be found, fetched or loaded."""
