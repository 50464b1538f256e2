"""The one base class for errors the user can fix (bad config, data, model, input).

The CLI prints such an error's message (which names the file or key and the problem) and exits
with status 2, without a traceback; anything else is a bug or an infrastructure failure.
"""


class UserError(ValueError):
    """A problem with what the user gave us; `str()` says what and where."""


class ModelError(UserError):
    """A model artifact or network that cannot be used as asked (missing or altered files, unknown layer)."""
