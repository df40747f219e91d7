"""The errors a user can cause, which the CLI reports in one line (exit status 2).

``ConfigError``: a config file, override or value that cannot work (the message names the key).
``StageError``: a request that cannot be met with what is on disk or asked for: a missing
checkpoint or dataset, a checkpoint of another model, an impossible video shape.
"""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key or path."""


class StageError(RuntimeError):
    """A stage or request cannot run (missing input, impossible request); the message says
    what to do."""
