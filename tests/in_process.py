"""A command's ``main`` run in the test's own process, its exit code and output as a process
gives them: for long lists of refusals of one kind, each kind of which also runs in a process of
its own (a process start costs about as much as a refusal)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import traceback
from typing import Callable, Sequence


def run_main(main: Callable[[Sequence[str]], int], *args: str, name: str = "mlx-unet") -> subprocess.CompletedProcess:
    """``main(ARGS)`` with stdout and stderr captured; an exception that escapes is a traceback on
    stderr and code 1, as the interpreter makes it, and argparse's exits give their codes."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001  (what a user would see)
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([name, *args], code, stdout.getvalue(), stderr.getvalue())
