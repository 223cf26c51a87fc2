"""User-facing errors: the CLI prints their message on one line, the server turns them into 4xx/503."""


class FastTextDiffError(Exception):
    """Base of every error whose message is meant for the user, not a traceback."""


class ImageReadError(FastTextDiffError, ValueError):
    """The image file is missing, corrupt, unsupported or of a shape we cannot segment."""


class ReportError(FastTextDiffError, ValueError):
    """The report text cannot be used (not text, or longer than the configured limit)."""


class ModelNotFoundError(FastTextDiffError, FileNotFoundError):
    """A model, backbone or text encoder directory is missing or incomplete."""


class ModelNotReadyError(ModelNotFoundError):
    """No model is served yet: none is published, or the default one is still being built or failed."""


class CheckpointError(FastTextDiffError, ValueError):
    """A checkpoint or cache file is truncated, corrupt or not in safetensors/JSON form."""


class DatasetLayoutError(FastTextDiffError, FileNotFoundError):
    """A folder, table, image or mask that the LViT layout requires is missing or unusable."""


class CorpusError(FastTextDiffError, ValueError):
    """A corpus path is missing or its files are not in the published layout."""


class TrainingError(FastTextDiffError, RuntimeError):
    """A training run could not go on: its loss diverged, or a launched run failed."""
