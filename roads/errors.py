"""The one error type users see: a message that names the place (file, key path, column) and says how to fix it."""


class RoadsError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(RoadsError):
    """A bad pipelines.yaml, override or pipeline name. Nothing has run or been written."""

    exit_code = 2


class DataError(RoadsError):
    """A bad data file, format or column."""

    exit_code = 2


class TrainingError(RoadsError):
    """A stage failed while training (for example a NaN or infinite loss). Nothing is cached."""

    exit_code = 1
