"""User-facing errors: the CLI prints their message on one line, the server turns them into 4xx."""


class FastTextDiffError(Exception):
    """Base of every error whose message is meant for the user, not a traceback."""


class ImageReadError(FastTextDiffError, ValueError):
    """The image file is missing, corrupt, unsupported or of a shape we cannot segment."""


class ReportError(FastTextDiffError, ValueError):
    """The report text cannot be used (not text, or longer than the configured limit)."""


class ModelNotFoundError(FastTextDiffError, FileNotFoundError):
    """A model, backbone or text encoder directory is missing or incomplete."""


class CheckpointError(FastTextDiffError, ValueError):
    """A checkpoint or cache file is truncated, corrupt or not in safetensors/JSON form."""
