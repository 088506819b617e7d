"""Generator divergences (STYLE habit 3): small callables turning the teacher's and the fake
score's denoiser outputs at x̂_t into a surrogate loss whose gradient is the divergence's.

For a student output x̂0 (depending on θ) and x̂_t = x̂0 + σε', the gradient of the
smoothed KL (DPDM Eq. 3.2-3.4) or of the integral KL (Diff-Instruct) with respect to θ is

    E[ w(σ) · (s_fake(x̂_t, σ) − s_teacher(x̂_t, σ)) · ∂x̂_t/∂θ ],   s(x, σ) = (D(x, σ) − x)/σ².

Since ∂x̂_t/∂θ = ∂x̂0/∂θ, the surrogate is ½‖x̂0 − sg(x̂0 − g)‖² with the detached
g = w(σ)(D_fake − D_teacher)/σ²: its value is ½‖g‖², its gradient g·∂x̂0/∂θ. Descending it
moves x̂0 towards the teacher's density and away from the fake's (the sign of DMD and
Diff-Instruct). The ``-x/σ²`` parts of the two scores cancel, so only the denoisers enter.

Each divergence also says how the student is fed (``student_input``) and at which σ its
output is re-noised (``renoise_sigma``); this is what separates DPDM from IKL.
"""

from __future__ import annotations

import torch

from .losses import sum_per_sample
from .sigmas import SigmaDist
from .utils import append_dims

WEIGHTINGS = ("diffusion", "edm", "score")


class Divergence:
    """Common part: the weighting w(σ) of Eq. 3.4 and the optional per-sample normaliser.

    The paper says only that w is "the same weighting function as diffusion training" (Eq. 2.3, score form).
    Two readings are offered:

    - ``weighting="diffusion"`` (the default): w(σ) = σ², the standard weighting of denoising score matching in
      score form (Song et al. 2021, λ(σ) = σ²) and Diff-Instruct's, whose IKL the paper builds on (App. A.3); g is
      then the difference of the two denoisers' outputs. On toy2d and digits (3 seeds each, README) it is far
      better than the other reading.
    - ``weighting="edm"``: EDM's own training weight written in score form, w(σ) = λ_EDM(σ)·σ⁴ =
      σ²(σ² + σ_d²)/σ_d², with λ_EDM(σ) = (σ² + σ_d²)/(σσ_d)² (Karras et al. 2022, Table 1); g is then
      (1 + σ²/σ_d²)·(D_fake − D_teacher). With the log-uniform σ law it puts almost all the weight on σ ≫ σ_d
      and the small-σ denoisers barely learn; paired with EDM's log-normal σ law it is better balanced but
      the student never learns σ near σ_max = 80, where Algorithm 2 starts.
    - ``weighting="score"``: w(σ) = 1, the raw score difference (large at small σ).

    ``normalize=True`` divides each sample's g by mean|x̂0 − D_teacher(x̂_t)| over its dimensions (DMD, Yin et
    al. 2024, Eq. 8), which equalises the step size across σ. It is DMD's, not the paper's: off by default.
    """

    def __init__(self, sigma: SigmaDist, weighting: str = "diffusion", normalize: bool = False, eps: float = 1e-8,
                 sigma_data: float = 0.5):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma = sigma  # distribution of the noise levels the divergence integrates over
        self.weighting = weighting
        self.normalize = bool(normalize)
        self.eps = float(eps)  # guards the normaliser against division by zero
        self.sigma_data = float(sigma_data)  # σ_d of weighting="edm" (the run passes the teacher's)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(σ) of Eq. 3.4 (score form), ``(B,)``."""
        if self.weighting == "edm":
            return sigma**2 * (sigma**2 + self.sigma_data**2) / self.sigma_data**2
        return sigma**2 if self.weighting == "diffusion" else torch.ones_like(sigma)

    def gradient(self, x0_hat, sigma, d_teacher, d_fake) -> torch.Tensor:
        """g = w(σ)·(s_fake − s_teacher) at x̂_t, optionally normalised; detached, shaped like x̂0."""
        with torch.no_grad():
            s = append_dims(sigma, x0_hat.ndim)
            g = append_dims(self.weight(sigma), x0_hat.ndim) * (d_fake - d_teacher) / s**2
            if self.normalize:
                dims = tuple(range(1, x0_hat.ndim))
                g = g / ((x0_hat - d_teacher).abs().mean(dim=dims, keepdim=True) + self.eps)
        return g

    def __call__(self, x0_hat, sigma, d_teacher, d_fake) -> torch.Tensor:
        """Per-sample surrogate loss ``(B,)``; its gradient w.r.t. x̂0 is ``gradient(...)``."""
        g = self.gradient(x0_hat, sigma, d_teacher, d_fake)
        target = (x0_hat - g).detach()
        return 0.5 * sum_per_sample((x0_hat - target) ** 2)


class SmoothedKL(Divergence):
    """DPDM's smoothed KL (Eq. 3.2-3.4): the student denoises *real* data noised at σ ~ ``sigma``,
    and its output is re-noised at the same σ (``renoise="same"``), so each noise level compares
    the denoised distribution with the data, both smoothed by that σ. ``renoise="independent"``
    draws a fresh σ instead (an ablation; it loses the recovery effect).

    ``renoise_max`` caps the re-noising σ. At very large σ (σ = 80 for one-step sampling) both
    smoothed densities are nearly the same wide Gaussian and the fake-minus-teacher difference
    is mostly estimation noise; comparing those outputs at a smaller σ keeps the same optimum
    (the smoothed KL at any σ > 0 vanishes only when the distributions are equal) with a
    stronger signal."""

    def __init__(self, sigma: SigmaDist, weighting: str = "diffusion", normalize: bool = False,
                 renoise: str = "same", renoise_max: float | None = None, eps: float = 1e-8, sigma_data: float = 0.5):
        super().__init__(sigma, weighting, normalize, eps, sigma_data)
        if renoise not in ("same", "independent"):
            raise ValueError(f"renoise must be 'same' or 'independent', got {renoise!r}")
        if renoise_max is not None and renoise_max <= 0:
            raise ValueError(f"renoise_max must be positive, got {renoise_max}")
        self.renoise = renoise
        # Cap on the re-noising σ: outputs made at σ > renoise_max are compared at renoise_max,
        # where the two smoothed densities still differ measurably (null: no cap).
        self.renoise_max = renoise_max

    def student_input(self, x0: torch.Tensor, generator=None):
        """x_t = x0 + σε with σ ~ ``sigma``; returns ``(x_t, σ)``."""
        sigma = self.sigma.draw(x0.shape[0], generator, x0.device, x0.dtype)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return x0 + append_dims(sigma, x0.ndim) * noise, sigma

    def renoise_sigma(self, sigma: torch.Tensor, generator=None) -> torch.Tensor:
        if self.renoise == "independent":
            sigma = self.sigma.draw(sigma.shape[0], generator, sigma.device, sigma.dtype)
        return sigma if self.renoise_max is None else sigma.clamp(max=self.renoise_max)


class IKL(Divergence):
    """Diff-Instruct's integral KL (Luo et al. 2023; DPDM Appendix A.3): a one-step generator fed pure noise
    (the student at ``generator_sigma``, data-free), its output re-noised at σ ~ ``sigma``, integrated over σ.

    Its defaults are Diff-Instruct's: ``weighting="diffusion"`` (w = σ²), no normaliser; with Diff-Instruct's
    σ law (EDM's lognormal, unclamped) and ``generator_sigma`` its init sigma, the gradient is Diff-Instruct's
    (``recipes/diff-instruct.yaml``; tested against a direct transcription of its update)."""

    def __init__(self, sigma: SigmaDist, weighting: str = "diffusion", normalize: bool = False,
                 generator_sigma: float = 80.0, eps: float = 1e-8, sigma_data: float = 0.5):
        super().__init__(sigma, weighting, normalize, eps, sigma_data)
        if not generator_sigma > 0:
            raise ValueError(f"generator_sigma (the noise level the generator starts from) must be positive, "
                             f"got {generator_sigma}")
        self.generator_sigma = float(generator_sigma)  # the σ the one-step generator starts from

    def student_input(self, x0: torch.Tensor, generator=None):
        """Pure noise ``generator_sigma·ε`` shaped like the data batch (the data values are unused)."""
        sigma = torch.full((x0.shape[0],), self.generator_sigma, device=x0.device, dtype=x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return append_dims(sigma, x0.ndim) * noise, sigma

    def renoise_sigma(self, sigma: torch.Tensor, generator=None) -> torch.Tensor:
        return self.sigma.draw(sigma.shape[0], generator, sigma.device, sigma.dtype)
