"""The one exception type the loader raises for bad checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint (config.json, index or safetensors file) is missing, corrupt or inconsistent.

    The message always names the file and, where there is one, the tensor or field at fault,
    what was found and what was expected.
    """
