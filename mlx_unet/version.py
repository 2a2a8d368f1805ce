"""The installed mlx-unet's version, for the records that say what made a file."""

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("mlx-unet")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
