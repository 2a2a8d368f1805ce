"""The command line: `mlx-unet generate | convert`."""
