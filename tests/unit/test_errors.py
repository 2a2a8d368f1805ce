"""One error hierarchy: every error a user can cause is an MlxUnetError, and a ValueError."""

import inspect

import pytest

from mlx_unet import errors
from mlx_unet.errors import MlxUnetError

CLASSES = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__]
ERROR_CLASSES = [cls for cls in CLASSES if issubclass(cls, BaseException) and not issubclass(cls, Warning)]
WARNING_CLASSES = [cls for cls in CLASSES if issubclass(cls, Warning)]


def test_errors_module_holds_the_hierarchy():
    assert {cls.__name__ for cls in ERROR_CLASSES} >= {
        "MlxUnetError", "ConfigError", "WeightsError", "InputError", "ConversionError", "PipelineError"}


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_is_an_mlx_unet_error_and_a_value_error(cls):
    # ValueError: code that caught it before the hierarchy existed keeps working.
    assert issubclass(cls, MlxUnetError) and issubclass(cls, ValueError)


def test_the_package_exports_every_error():
    import mlx_unet

    assert len(ERROR_CLASSES) + len(WARNING_CLASSES) == len(CLASSES)
    for cls in CLASSES:
        assert getattr(mlx_unet, cls.__name__) is cls


@pytest.mark.parametrize("cls", WARNING_CLASSES, ids=lambda cls: cls.__name__)
def test_every_warning_is_an_mlx_unet_warning(cls):
    assert issubclass(cls, errors.MlxUnetWarning) and issubclass(cls, UserWarning)


def test_a_command_shows_warnings_as_one_line_and_no_resource_warnings(tmp_path, capsys):
    # A signal between open() and its with-block drops an open file (seen in a killed conversion):
    # its "unclosed file" ResourceWarning must not reach the user's terminal.
    import gc
    import warnings

    from mlx_unet.cli.common import run_command

    def body() -> int:
        (tmp_path / "f").write_bytes(b"x")
        handle = open(tmp_path / "f", "rb")  # noqa: SIM115 - dropped unclosed on purpose
        del handle
        gc.collect()
        warnings.warn("something to say", errors.MlxUnetWarning)
        return 0

    assert run_command(body, lambda: "nothing was written") == 0
    assert capsys.readouterr().err == "warning: something to say\n"
