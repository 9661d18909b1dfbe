"""The base class of errors in what a user gave us: the `ftjax` command prints one line, exit 2."""


class UserError(ValueError):
  """A config value, file, folder or checkpoint the user gave is unusable; the message says
  which one and what was expected."""
