"""The shape every naming table shares: module paths of two layouts, one to one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Take:
    """Where one parameter comes from: a key in the source, and how its (PyTorch-layout) value is
    cut from the stored tensor where the source stores it differently from diffusers.

    ``rows=(i, n)``: the i-th of n equal row blocks (open_clip fuses q, k and v in one in_proj);
    ``transpose``: a matrix the source multiplies from the right (``x @ W``), where a Linear
    keeps ``W.T``; ``squeeze``: a 1x1 convolution kernel that diffusers holds as a Linear weight.
    """

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    squeeze: bool = False

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``apply`` makes of a tensor of shape ``stored`` (left alone where it cannot
        apply, so that the shape check reports the stored shape)."""
        shape = tuple(stored)
        if self.rows is not None and shape and shape[0] % self.rows[1] == 0:
            shape = (shape[0] // self.rows[1], *shape[1:])
        if self.squeeze and len(shape) > 2 and all(d == 1 for d in shape[2:]):
            shape = shape[:2]
        if self.transpose and len(shape) == 2:
            shape = shape[::-1]
        return shape

    def apply(self, array):
        """The parameter, from the stored tensor (an MLX, numpy or torch array)."""
        if self.rows is not None:
            index, count = self.rows
            size = array.shape[0] // count
            array = array[index * size:(index + 1) * size]
        if self.squeeze and array.ndim > 2:
            array = array.reshape(array.shape[:2])
        if self.transpose:
            array = array.T
        return array


def _renamed(name: str, modules: dict[str, str]) -> str | None:
    """``name`` with its longest leading module path replaced; what lies below it keeps its name."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        target = modules.get(".".join(parts[:cut]))
        if target is not None:
            return ".".join([target, *parts[cut:]])
    return None


class NameTable:
    """diffusers module paths <-> a source layout's, for one architecture.

    ``modules`` maps diffusers' path of each module to the source's. A name below a mapped module
    (a parameter, or a submodule both layouts share, as a transformer block's internals) keeps
    its tail. Names are given without ``prefix``, the part's place in a whole single file; the
    ``Take`` keys of :meth:`take` and :meth:`parameters` carry it.
    """

    # Tensors the source stores that are no parameters of the model (buffers, training state).
    not_parameters: tuple[str, ...] = ()

    def __init__(self, modules: dict[str, str], prefix: str):
        self.modules = modules
        self.sources = {source: ours for ours, source in modules.items()}
        if len(self.sources) != len(modules):
            raise ValueError("two diffusers modules map to the same source module")
        self.prefix = prefix

    def to_source(self, name: str) -> str | None:
        """The source's name of a diffusers module or parameter; None where it has none."""
        return _renamed(name, self.modules)

    def to_diffusers(self, name: str) -> str | None:
        """The diffusers name of a source module or parameter; None where it has none."""
        return _renamed(name, self.sources)

    def take(self, parameter: str) -> Take | None:
        """Where diffusers parameter ``parameter`` is stored in a whole file, and how it is cut."""
        source = self.to_source(parameter)
        return None if source is None else Take(self.prefix + source, **self._how(parameter))

    def parameters(self, key: str) -> dict[str, Take]:
        """The diffusers parameters stored at ``key`` of a whole file (empty where it holds none)."""
        ours = self.to_diffusers(key.removeprefix(self.prefix)) if key.startswith(self.prefix) else None
        return {} if ours is None else {ours: Take(key, **self._how(ours))}

    def _how(self, parameter: str) -> dict:
        """``Take``'s cutting fields for ``parameter``: none where both layouts store it alike."""
        return {}

    def names(self, keys: Iterable[str]) -> tuple[dict[str, Take], list[str]]:
        """Each diffusers parameter of the keys below ``prefix``, and the keys there that fit no
        name (stored non-parameters aside)."""
        names: dict[str, Take] = {}
        unmapped = []
        for key in keys:
            if not key.startswith(self.prefix):
                continue
            found = self.parameters(key)
            if found:
                names.update(found)
            elif not key.endswith(self.not_parameters):
                unmapped.append(key)
        return names, unmapped
