"""The one error type of external weights: missing, malformed or not fitting the model."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model it is loaded into.

    Every reader under :mod:`exo2ego_jax.weights` raises this (never a bare ``KeyError``,
    ``TypeError`` or ``MemoryError``); the message names the file, the tensor or
    ``config.json`` field, what is wrong and, where there is one, what to do.
    """
