"""Errors raised for bad input: each message names the file, field or setting to fix."""


class StreamConfigError(ValueError):
    """An impossible or inconsistent setting, or input data the stream cannot use."""
