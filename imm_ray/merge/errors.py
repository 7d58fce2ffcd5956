"""The one error type of the merge engine: a problem with the user's inputs or options, stated in one line."""


class MergeError(ValueError):
    """Bad merge input (mismatched models, corrupt file, non-finite result, existing output, ...).

    The message names the file, tensor or option at fault; callers show it as is, without a traceback.
    """


class PickleCheckpointError(MergeError):
    """A model folder holds only pickle checkpoints, which the merge engine refuses to load."""
