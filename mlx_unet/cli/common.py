"""What every command shares: how a user's mistake, a warning and an interruption reach the
terminal. A mistake is one line ``error: ...`` and exit code 2 (argparse's usage errors too);
a warning is one line ``warning: ...`` on stderr, whatever the progress setting; Ctrl-C and
SIGTERM end the command through the same clean-up (no partial output is left) with exit code
130 and 143. Anything else raised is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Callable, NoReturn

from ..configs.quantization import MODES, Quantization, text_encoder_quantization
from ..errors import InputError, MlxUnetError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (the usage itself is a --help away)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help.", file=sys.stderr)
        sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python is when it arrives: the same clean-up as Ctrl-C runs."""


def _terminate(signum, frame) -> NoReturn:
    raise Terminated


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe_os_error(error: OSError) -> str:
    """An OSError as a sentence that names its path: "could not write out.png: No space left on device"."""
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason


def run_command(body: Callable[[], int], interrupted: Callable[[], str]) -> int:
    """Run a command's ``body`` with the shared handling; ``interrupted()`` says what an
    interruption left (e.g. "nothing was written")."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            # An interruption can land between open() and its with-block; the file is closed by its
            # finaliser, and "unclosed file" would be a line about our internals, not the user's input.
            warnings.simplefilter("ignore", ResourceWarning)
            warnings.showwarning = _show_warning
            return body()
    except MlxUnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused what the user asked for: a path, space, rights
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted; {interrupted()}.", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_quantization_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--quantize``, ``--q-group-size``, ``--q-mode``, ``--quantize-text-encoders``; ``what``
    says what they act on ("as it loads", "in the output")."""
    parser.add_argument("--quantize", type=int, choices=(8, 4), help=f"quantize the UNet {what} to 8 or 4 bits")
    parser.add_argument("--q-group-size", type=int, choices=(32, 64, 128),
                        help="weights per quantization group (default: 64; 32 for the mx modes)")
    parser.add_argument("--q-mode", choices=list(MODES), default="affine",
                        help="MLX quantization mode (default: affine; mxfp8/mxfp4 where the installed MLX has them)")
    parser.add_argument("--quantize-text-encoders", choices=("none", "8", "4"),
                        help="the text encoders' bits (default: 8 when --quantize is given; none: keep them dense)")


def quantization_arguments(args: argparse.Namespace) -> tuple[Quantization | None, Quantization | None]:
    """(the UNet's, the text encoders') quantization from the command line, checked."""
    if args.quantize is None:
        if args.q_group_size is not None or args.q_mode != "affine" or args.quantize_text_encoders not in (None, "none"):
            raise InputError("--q-group-size, --q-mode and --quantize-text-encoders go with --quantize; add "
                             "--quantize 8 or --quantize 4.")
        return None, None
    unet = Quantization.make(args.quantize, args.q_group_size, args.q_mode)
    return unet, text_encoder_quantization(unet, args.quantize_text_encoders)
