"""The command line: ``mlx-unet generate ...`` (prompts, and images, to PNGs; ``--demo`` for a
first run with nothing downloaded), ``mlx-unet convert ...`` (a diffusers or original checkpoint to
an MLX folder) and ``mlx-unet info ...`` (what a checkpoint or folder is). ``mlx-unet COMMAND
--help`` tells more."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module whose main(argv) runs it, one line of help). Imported only when asked for:
# each pulls in what its command needs.
COMMANDS = {
    "generate": ("mlx_unet.cli.generate", "make PNGs from prompts (and images, masks) with any SD 1.x/2.x/XL model; "
                                          "--demo: a first run, nothing downloaded"),
    "convert": ("mlx_unet.cli.convert", "convert a diffusers folder, Hub repo or single file to MLX"),
    "info": ("mlx_unet.cli.info", "what a checkpoint or folder is: family, sizes, dtype, quantization, LoRAs"),
}


def _usage() -> str:
    commands = "\n".join(f"  {name:10s} {help}" for name, (_, help) in COMMANDS.items())
    return f"usage: mlx-unet {{{','.join(COMMANDS)}}} ...\n\ncommands:\n{commands}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{_usage()}\n\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
    except KeyboardInterrupt:  # Ctrl-C while the command's modules load: nothing has started
        print("\ninterrupted; nothing was written.", file=sys.stderr)
        return 130
    return module.main(rest)
