"""The exceptions img2vid raises on purpose. Each says what went wrong in words a user can act on."""


class Img2VidError(Exception):
    """Base class: an expected failure with a message meant for the user (no traceback needed)."""


class ImageError(Img2VidError, ValueError):
    """The input image cannot be used: not an image, truncated, too large, or a bad target size."""


class CheckpointError(Img2VidError):
    """A checkpoint cannot be found, read, or does not match the network (names the keys)."""


class UsageError(Img2VidError):
    """A bad command-line value: reported in one line, exit status 2."""


class ParameterError(Img2VidError, ValueError):
    """A generation parameter is out of range; `.field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotEnoughMemory(ParameterError):
    """A generation too large for the memory free on its device; `.fields` names the parameters that set
    its size (`.field` the first, as for any ParameterError)."""

    def __init__(self, fields, message: str):
        Img2VidError.__init__(self, f"{', '.join(fields)}: {message}")
        self.field, self.fields = fields[0], tuple(fields)


class Cancelled(Img2VidError):
    """Generation was stopped by the progress callback (it returned False)."""
