"""One error hierarchy: every error a user can cause is an MlxUnetError, and a ValueError."""

import inspect

import pytest

from mlx_unet import errors
from mlx_unet.errors import MlxUnetError

ERROR_CLASSES = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__]


def test_errors_module_holds_the_hierarchy():
    assert {cls.__name__ for cls in ERROR_CLASSES} >= {
        "MlxUnetError", "ConfigError", "WeightsError", "InputError", "ConversionError", "PipelineError"}


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_is_an_mlx_unet_error_and_a_value_error(cls):
    # ValueError: code that caught it before the hierarchy existed keeps working.
    assert issubclass(cls, MlxUnetError) and issubclass(cls, ValueError)


def test_the_package_exports_every_error():
    import mlx_unet

    for cls in ERROR_CLASSES:
        assert getattr(mlx_unet, cls.__name__) is cls
