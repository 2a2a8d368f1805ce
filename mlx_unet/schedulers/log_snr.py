"""What the multistep solvers in log-SNR time share (DPM-Solver, UniPC, DEIS): the training
schedule before ``set_timesteps``, unscaled model input, the data estimate, the VP ``add_noise``
and diffusers' fallback to the last step for an unknown timestep."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from .base import Scheduler, per_item, rounded, sigma_table


def alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VP-space alpha_t, sigma_t and log-SNR lambda of Euler-space sigmas, float32 as diffusers.

    lambda is +inf at a final sigma of 0, where every update then returns x0 exactly.
    """
    alpha = np.float32(1.0) / np.sqrt(sigmas * sigmas + np.float32(1.0))
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        return alpha, sigma, rounded(np.log, alpha) - rounded(np.log, sigma)


def data_estimate(prediction_type: str, model_output: mx.array, sample: mx.array, alpha: float,
                  sigma: float) -> mx.array:
    """x0 from the model output at VP (alpha, sigma), float32, in diffusers' order of operations."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return alpha * sample - sigma * model_output  # v_prediction


class LogSNRScheduler(Scheduler):
    """The shared base. ``timesteps`` are integers (int32 here, int64 in diffusers); before
    ``set_timesteps``, as diffusers: the training timesteps, and ``sigmas`` the ascending
    training table. The solvers keep past model outputs: call ``set_timesteps`` before each run."""

    init_noise_sigma = 1.0

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._table = sigma_table(self.alphas_cumprod_np)
        T = self.config.num_train_timesteps
        self._timesteps_np = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self.timesteps = mx.array(self._timesteps_np)
        self.sigmas_np = self._table.copy()
        self.sigmas = mx.array(self.sigmas_np)

    def _missing_timestep(self, timestep: float) -> int:
        # diffusers' multistep solvers fall back to the last step for an unknown timestep.
        return len(self._timesteps_np) - 1

    def scale_model_input(self, sample: mx.array, timestep: Any = None) -> mx.array:
        """Identity: these solvers work on unscaled samples."""
        return sample

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """alpha_t x + sigma_t noise (VP form), one timestep per batch item."""
        sigma = per_item(self.sigmas_np[self._add_noise_indices(timesteps)], original_samples)
        alpha_t = 1 / mx.sqrt(sigma * sigma + 1)
        return alpha_t * original_samples + (sigma * alpha_t) * noise
