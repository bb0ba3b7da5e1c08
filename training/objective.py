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

Two of kohya's recipe options act here (both off by default, which leaves every draw and the
loss exactly as above):

    noise offset       ε ← ε + o·n, n ~ N(0, 1) per sample and channel (shape (B, C, 1, 1)), with
                       o = offset + adaptive·|mean of x0 over its spatial axes| (clamped at 0) when
                       adaptive_noise_scale is set: kohya's apply_noise_offset, in model space
    min-SNR-γ          each sample's loss × w(σ): kohya's apply_snr_weight with SNR from the
                       model's own σ (SNR = 1/σ² = ᾱ/(1 − ᾱ) for SD's schedule):
                         eps   min(SNR, γ) / SNR
                         v     min(SNR, γ) / (SNR + 1)
                         flow  min(SNR, γ) / SNR with SNR = ((1 − σ)/σ)², the flow's own signal-to-
                               noise ratio (kohya applies none to SD3/Flux; this down-weights only
                               the low-noise steps, SNR > γ, by γ/SNR, and leaves the rest at 1)
"""
from __future__ import annotations

import math
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


def snr(prediction: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Signal-to-noise ratio of x_t at σ: (σ_data/σ)² for SD's x_t = x0 + σ·ε (= ᾱ/(1 − ᾱ)),
    ((1 − σ)/σ)² for rectified flow's x_t = (1 − σ)·x0 + σ·ε."""
    s = sigma.double()
    if prediction == "flow":
        return ((1.0 - s) / s) ** 2
    return (sigma_data / s) ** 2


def min_snr_weight(prediction: str, sigma: torch.Tensor, gamma: float, sigma_data: float = 1.0) -> torch.Tensor:
    """kohya's apply_snr_weight as a per-sample factor (float32, shaped like ``sigma``)."""
    r = snr(prediction, sigma, sigma_data)
    if prediction == "v":
        w = torch.clamp(r, max=gamma) / (r + 1.0)
    else:   # min(SNR, γ)/SNR written as min(1, γ/SNR): 1 (not 0/0) where SNR = 0 (flow at σ = 1)
        w = torch.clamp(gamma / r, max=1.0)
    return w.float()


def offset_noise(x0: torch.Tensor, noise: torch.Tensor, offset: float, adaptive: float,
                 generator: torch.Generator | torch.Tensor) -> torch.Tensor:
    """kohya's apply_noise_offset: a per-sample, per-channel constant added to the noise. ``generator``
    draws the normal factor n (B, C, 1, ...), or is that draw already made."""
    shape = (*x0.shape[:2], *[1] * (x0.dim() - 2))
    n = generator if isinstance(generator, torch.Tensor) else torch.randn(shape, generator=generator,
                                                                          dtype=torch.float32)
    n = n.to(device=noise.device, dtype=noise.dtype)
    o = offset
    if adaptive:
        o = torch.clamp(offset + adaptive * x0.mean(dim=tuple(range(2, x0.dim())), keepdim=True).abs(), min=0.0)
    return noise + o * n


class Objective:
    """Draws (x_t, σ, target) for a batch of clean latents, as the model itself defines them."""

    def __init__(self, sampling, prediction: str, loss: str = "MSE", *, min_snr_gamma: float = 0.0,
                 noise_offset: float = 0.0, adaptive_noise_scale: float = 0.0):
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
        self.loss_name = loss
        self.min_snr_gamma = float(min_snr_gamma)
        self.noise_offset = float(noise_offset)
        self.adaptive_noise_scale = float(adaptive_noise_scale)
        if not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0):
            raise TrainingError(f"min_snr_gamma = {min_snr_gamma} must be > 0 (or 0 for off)")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise TrainingError(f"noise_offset = {noise_offset} must be ≥ 0 (0 for off)")
        if not math.isfinite(self.adaptive_noise_scale):
            raise TrainingError(f"adaptive_noise_scale = {adaptive_noise_scale} must be a finite number")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise TrainingError("adaptive_noise_scale needs a noise_offset > 0 (as in kohya)")

    def draw(self, x0: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, σ, target) for clean latents ``x0`` (B, ...); randomness only from ``generator`` (CPU):
        one generator for the batch, or a sequence of B generators, one per sample (each sample's
        σ, noise and noise offset then come from its own, whatever else is in the batch)."""
        if isinstance(generator, torch.Generator):
            idx, noise, extra = self._random(x0.shape, generator)
        else:
            if len(generator) != x0.shape[0]:
                raise TrainingError(f"{len(generator)} generators for a batch of {x0.shape[0]}")
            parts = [self._random((1, *x0.shape[1:]), g) for g in generator]
            idx, noise = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            extra = torch.cat([p[2] for p in parts]) if self.noise_offset else None
        sigma = self.sigmas[idx].to(x0.device)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        if self.noise_offset:
            noise = offset_noise(x0, noise, self.noise_offset, self.adaptive_noise_scale, extra)
        x_t = self.sampling.noise_scaling(sigma, noise, x0, False)
        return x_t, sigma, target(self.prediction, x0, noise, sigma, self.sigma_data)

    def _random(self, shape, generator: torch.Generator):
        """(σ indices, noise, the noise offset's normal draw or None), in that order from ``generator``."""
        idx = torch.randint(0, self.sigmas.numel(), (shape[0],), generator=generator)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        extra = None
        if self.noise_offset:
            extra = torch.randn((*shape[:2], *[1] * (len(shape) - 2)), generator=generator, dtype=torch.float32)
        return idx, noise, extra

    def batch_loss(self, pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The loss of a batch: the plain loss, or with min-SNR-γ the mean of each sample's loss × w(σ)."""
        if not self.min_snr_gamma:
            return self.loss(pred, target)
        return self.sample_losses(pred, target, sigma).mean()

    def sample_losses(self, pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Each sample's loss (B,): the mean over its elements, × w(σ) with min-SNR-γ. Their mean is
        the batch loss, and a share of a batch contributes the sum of its samples' losses / B."""
        per_sample = self.loss(pred, target, reduction="none").flatten(1).mean(dim=1)
        if not self.min_snr_gamma:
            return per_sample
        w = min_snr_weight(self.prediction, sigma, self.min_snr_gamma, self.sigma_data).to(per_sample.device)
        return per_sample * w


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
           "min_snr_weight", "offset_noise", "snr", "target"]
