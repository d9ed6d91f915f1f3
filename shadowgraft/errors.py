"""The one exception type shadowgraft raises for bad input."""


class ShadowgraftError(Exception):
    """A problem with the user's input, stated in one line with what to do.

    Example: ``'model.layers.3.mlp.up_proj.weight': base (4096, 11008) != tuned (4096, 14336); pass --exclude to skip it``
    Missing paths raise the builtin ``FileNotFoundError`` instead.
    """
