"""User-facing errors of stage 1: each one's message is a single line naming the file/row and the problem."""


class CusaError(Exception):
    """Base of every error caused by user input; the CLI prints it as one line, never a traceback."""


class ManifestError(CusaError):
    """An annotation file cannot be read into a manifest."""


class EncoderError(CusaError):
    """An encoder spec is unknown or its weights cannot be loaded."""


class ImageError(CusaError):
    """An image file is missing, truncated, undecodable or refused."""
