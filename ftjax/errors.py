"""The base class of errors in what a user gave us: the `ftjax` command prints one line, exit 2."""


class UserError(ValueError):
  """A config value, file, folder or checkpoint the user gave is unusable; the message says
  which one and what was expected."""


class CheckpointError(UserError):
  """A checkpoint (ftjax's Orbax one, or a Hugging Face folder) is missing, damaged or does not
  fit the model it is loaded into (the message says which file and how)."""
