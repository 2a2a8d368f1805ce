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
