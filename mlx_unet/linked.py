"""Weights left in their source: a model folder whose ``linked_tensors.json`` says, for each
parameter, which tensor of which safetensors file holds it and how it is cut from it, in place of
a ``model.safetensors`` copy.

The cache links a local source's models where converting them would change no value: the
source's tensors are all in the model's dtype, or in a half precision that it holds exactly
(``holds_exactly``). Loading then reads the source itself and lays each tensor out as it goes
(``weights.StoredTensor``): PyTorch's convolution layout, and OpenCLIP's fused or transposed
projections (``naming.Take``). An SDXL entry's tables take a few hundred KB, where a copy took
7 GB. Each table records its files' sizes and modification times, and a file changed since is
refused, never read as the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from .errors import WeightsError
from .jsonfile import read_json
from .naming import Take
from .safetensors_io import SafetensorsReader

LINKS = "linked_tensors.json"
FORMAT = "mlx-unet linked tensors 1"

# A model's dtype -> the stored dtypes whose every value it holds unchanged.
_EXACT = {"float32": {"F32", "F16", "BF16"}, "float16": {"F16"}, "bfloat16": {"BF16"}}


def holds_exactly(dtype: str, stored: set[str]) -> bool:
    """Whether a model in ``dtype`` holds every value of tensors stored in ``stored`` (safetensors
    names) unchanged: what linking a model instead of converting it takes."""
    return bool(stored) and stored <= _EXACT.get(dtype, set())


@dataclass(frozen=True)
class Link:
    """Where one parameter lies: tensor ``take.key`` of the safetensors file ``path``, cut by
    ``take`` (in PyTorch's layout, as the source stores it)."""

    path: Path
    take: Take


def has_links(folder: Path) -> bool:
    return (folder / LINKS).is_file()


def write_links(folder: Path, links: dict[str, Link], dtype: str, source: str) -> None:
    """``folder``'s table for ``links``, the model held in ``dtype`` (``source``: a description)."""
    paths = sorted({link.path.resolve() for link in links.values()})
    index = {path: i for i, path in enumerate(paths)}
    stats = [path.stat() for path in paths]
    files = [{"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns} for path, st in zip(paths, stats)]
    tensors = {}
    for name in sorted(links):
        link = links[name]
        entry: dict[str, Any] = {"file": index[link.path.resolve()], "key": link.take.key}
        if link.take.rows is not None:
            entry["rows"] = list(link.take.rows)
        if link.take.transpose:
            entry["transpose"] = True
        if link.take.squeeze:
            entry["squeeze"] = True
        tensors[name] = entry
    table = {"format": FORMAT, "dtype": dtype, "source": source, "files": files, "tensors": tensors}
    with open(folder / LINKS, "w") as f:
        f.write(json.dumps(table, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())  # as a copy's weights are: on disk before the folder is renamed into place


def read_links(folder: Path) -> tuple[dict[str, tuple[SafetensorsReader, Take]], str]:
    """``folder``'s parameters, each as the reader of its file and how it is cut from it, and the
    dtype its model is held in; after checking that each file is there, unchanged since the
    table was written, and holds the tensors it names."""
    path = folder / LINKS
    table = read_json(path, LINKS, WeightsError, _AGAIN)
    try:
        if table.get("format") != FORMAT:
            raise ValueError(f"its format is {table.get('format')!r}, not {FORMAT!r}")
        dtype = table["dtype"]
        if dtype not in _EXACT:
            raise ValueError(f"its dtype {dtype!r} is none of {', '.join(_EXACT)}")
        files = [_checked_file(Path(f["path"]), f["size"], f["mtime_ns"], folder) for f in table["files"]]
        links = {name: Link(files[_count(t["file"], len(files))], _take(t))
                 for name, t in table["tensors"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise WeightsError(f"{path} is not a table mlx-unet wrote ({e}); {_AGAIN}.") from None
    readers = {file: SafetensorsReader(file, fix=_AGAIN) for file in set(files)}
    for name, link in links.items():
        if link.take.key not in readers[link.path]:
            raise WeightsError(f"{link.path} holds no tensor {link.take.key!r}, which {path} names for {name}; "
                               f"{_AGAIN}.")
    return {name: (readers[link.path], link.take) for name, link in links.items()}, dtype


_AGAIN = "convert the model again from its source"


def _checked_file(path: Path, size: int, mtime_ns: int, folder: Path) -> Path:
    try:
        stat = path.stat()
    except OSError as e:
        raise WeightsError(f"{path}, whose tensors {folder} reads, cannot be read ({e.strerror or e}); put it back, "
                           f"or {_AGAIN}.") from None
    if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns) or not S_ISREG(stat.st_mode):
        raise WeightsError(f"{path} has changed since {folder} was made from it (its size or modification time "
                           f"differs), so its tensors may not be the model's; {_AGAIN}.")
    return path


def _count(value: Any, limit: int) -> int:
    if type(value) is not int or not 0 <= value < limit:
        raise ValueError(f"{value!r} is no file of the table's {limit}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is no tensor name")
    return value


def _take(entry: dict[str, Any]) -> Take:
    rows = entry.get("rows")
    if rows is not None:
        if not (isinstance(rows, list) and len(rows) == 2 and type(rows[1]) is int and rows[1] > 0):
            raise ValueError(f"rows {rows!r} are not [index, count]")
        rows = (_count(rows[0], rows[1]), rows[1])
    transpose, squeeze = entry.get("transpose", False), entry.get("squeeze", False)
    if not (isinstance(transpose, bool) and isinstance(squeeze, bool)):
        raise ValueError("transpose and squeeze are true or false")
    return Take(_text(entry["key"]), rows, transpose, squeeze)
