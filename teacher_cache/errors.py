"""Errors raised by the store; messages name the store path and what is wrong."""


class StoreError(Exception):
    """A store is missing, incomplete, corrupted, or does not match what the caller expects."""


class StoreMismatch(StoreError):
    """A store was built from another manifest, teacher or format version than the caller's."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class RemoteError(StoreError):
    """A URL could not be read or written: the message names the URL (secrets redacted) and what was expected."""
