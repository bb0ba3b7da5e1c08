"""The training objective, taken from the model's own sampling definition.

The caller hands in the model's sampling object (ComfyUI's ``model_sampling``, or one of the
plain-torch schedules below) and its prediction type. Per sample:

    σ      drawn uniformly over the model's own discrete schedule ``sampling.sigmas``
           (SD: the 1000 DDPM timesteps; flow models: their shifted σ table)
    ε      standard normal noise, shaped like the latent
    x_t    = sampling.noise_scaling(σ, ε, x0)       the model's own forward process
    target = what the raw network output must be for the model to denoise x_t back to x0:

        eps   ε                                      (SD1.x, SD2 base, SDXL)
        v     (d·ε − σ·x0/d) / √(σ² + d²)            (SD2 768-v; d = sigma_data, 1 for SD)
        flow  ε − x0                                 (SD3, Flux and other rectified-flow models)

The loss compares the raw network output with that target (not the reconstructed x0, which
weights every timestep by σ² and washes out the low-noise steps). Latents enter model space
through the model's latent format (``process_in``) before any of this, on every path.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import TrainingError

PREDICTIONS = ("eps", "v", "flow")

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "MSE": F.mse_loss,
    "L1": F.l1_loss,
    "Huber": F.huber_loss,
    "SmoothL1": F.smooth_l1_loss,
}


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise TrainingError(f"loss function {name!r} is not known; choose one of {', '.join(LOSSES)}") from None


def _shaped(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *[1] * (like.dim() - 1))


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
           sigma_data: float = 1.0) -> torch.Tensor:
    """The raw network output that makes the model's denoiser return exactly ``x0``."""
    s = _shaped(sigma, x0).to(x0.dtype)
    if prediction == "eps":
        return noise
    if prediction == "v":
        d = sigma_data
        return (noise * d - x0 * (s / d)) / (s * s + d * d).sqrt()
    if prediction == "flow":
        return noise - x0
    raise TrainingError(f"prediction type {prediction!r} cannot be trained; supported: {', '.join(PREDICTIONS)}")


class Objective:
    """Draws (x_t, σ, target) for a batch of clean latents, as the model itself defines them."""

    def __init__(self, sampling, prediction: str, loss: str = "MSE"):
        if prediction not in PREDICTIONS:
            raise TrainingError(f"prediction type {prediction!r} cannot be trained; supported: {', '.join(PREDICTIONS)}")
        sigmas = getattr(sampling, "sigmas", None)
        if sigmas is None or sigmas.numel() == 0:
            raise TrainingError("the model's sampling has no sigma schedule (sampling.sigmas) to draw timesteps from")
        self.sampling = sampling
        self.prediction = prediction
        self.sigmas = sigmas.detach().float().cpu()
        self.sigma_data = float(getattr(sampling, "sigma_data", 1.0))
        self.loss = loss_fn(loss)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, σ, target) for clean latents ``x0`` (B, ...); randomness only from ``generator`` (CPU)."""
        n = x0.shape[0]
        idx = torch.randint(0, self.sigmas.numel(), (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        sigma = self.sigmas[idx].to(x0.device)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        x_t = self.sampling.noise_scaling(sigma, noise, x0, False)
        return x_t, sigma, target(self.prediction, x0, noise, sigma, self.sigma_data)


# ---- plain-torch schedules (no ComfyUI), with the method names ComfyUI's model_sampling uses ----
class DiscreteSchedule:
    """SD1.x / SD2 / SDXL: DDPM 'scaled linear' betas, σ_t = √((1 − ᾱ_t) / ᾱ_t), x_t = x0 + σ·ε."""

    sigma_data = 1.0

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * _shaped(sigma, noise)

    def calculate_input(self, sigma, x):
        return x / (_shaped(sigma, x) ** 2 + self.sigma_data ** 2) ** 0.5

    def timestep(self, sigma):
        """Index of the nearest σ in the table (the t the UNet was trained with)."""
        return (self.sigmas.to(sigma.device).log()[None, :] - sigma.log()[:, None]).abs().argmin(dim=1).float()


class FlowSchedule:
    """Rectified flow: x_t = σ·ε + (1 − σ)·x0 with σ = shift·t / (1 + (shift − 1)·t), t = 1/N … 1."""

    sigma_data = 1.0

    def __init__(self, shift: float = 1.0, timesteps: int = 1000, multiplier: float = 1000.0):
        t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        self.sigmas = (shift * t / (1 + (shift - 1) * t)).float()
        self.multiplier = multiplier

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        s = _shaped(sigma, noise)
        return s * noise + (1.0 - s) * latent_image

    def calculate_input(self, sigma, x):
        return x

    def timestep(self, sigma):
        return sigma * self.multiplier


def describe(prediction: str) -> str:
    return {"eps": "ε (noise)", "v": "v (velocity, v-prediction)", "flow": "flow velocity ε − x0"}.get(prediction, prediction)


__all__ = ["LOSSES", "PREDICTIONS", "DiscreteSchedule", "FlowSchedule", "Objective", "describe", "loss_fn",
           "target"]
