"""The CPU's containers (the VAE's encoder and decoder, the up- and downsamplers) take their
plain counterparts' places holding the same children: built by adoption, not by ``__init__``,
which would build fresh layers only to drop them."""

import mlx.nn as nn


def adopted(cls, module: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``module``'s class) holding ``module``'s children and
    plain attributes (a downsampler's padding, say)."""
    adoptee = cls.__new__(cls)
    nn.Module.__init__(adoptee)
    vars(adoptee).update(vars(module))
    for name, child in module.items():
        adoptee[name] = child
    return adoptee
