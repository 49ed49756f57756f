"""Output distributions: what a model's output parameterises, one distribution per subpixel.

Two families share one interface, so likelihood, training and the samplers never look at the layout:

* ``Categorical(levels)``: a ``levels``-way softmax; the output is logits ``[B, levels, C, H, W]``
  (PixelCNN, Gated PixelCNN).
* ``DiscretizedLogisticMixture(nr_mix, channels, levels)``: PixelCNN++'s mixture of ``nr_mix`` discretized
  logistics (Salimans et al. 2017, arXiv 1701.05517); the output is ``[B, num_params, H, W]``.

Interface (``params`` is a model's output; ``pixel = params[..., i, j]`` the parameters of one pixel):

    log_prob(params, levels)                  -> [B, C, H, W]: exact log p(x_c | x_<c) in nats, in params' dtype
    channel_logits(pixel, pixel_levels, c)    -> [B, levels]: log p(v | the pixel's channels < c) for every v,
                                                 up to a constant per row
    sample(pixel, pixel_levels, c, u, T)      -> (levels [B], log p at T=1 [B] float64): one subpixel by
                                                 inverse CDF from one uniform per image (``draw``)

``log_prob`` summed over channels, pixels and images is the exact log-likelihood, so bits/dim is
comparable across families. Temperature means the same for both: each subpixel's exact conditional
distribution p(v | ...) is sharpened to p^(1/T) (normalised); for the softmax that is logits / T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw of one level per row of ``logits [B, L]``; returns (levels, log p at T=1)."""
    logits = logits.double()
    cdf = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1).cumsum(-1)
    # levels whose cumulative probability is <= u come before it (so u = 0 skips a probability-0 level)
    level = (cdf <= u[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, level[:, None])[:, 0]
    return level, log_prob


class Categorical:
    """A ``levels``-way softmax per subpixel: logits ``[B, levels, C, H, W]``."""

    def __init__(self, levels: int = 256):
        self.levels = levels

    def num_params(self, channels: int) -> int:
        return self.levels * channels

    def log_prob(self, logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != levels.dim() + 1 or logits.shape[1] != self.levels:
            raise ValueError(f"expected softmax logits [B, {self.levels}, C, H, W] for levels {list(levels.shape)}, got "
                             f"{list(logits.shape)} (pass the model's own distribution: model.config.distribution())")
        return -F.cross_entropy(logits, levels.long(), reduction="none")

    def channel_logits(self, pixel: torch.Tensor, pixel_levels: torch.Tensor, c: int) -> torch.Tensor:
        # The network already saw channels < c (masked convs): its logits for c are the conditional.
        return pixel[:, :, c]

    def sample(self, pixel, pixel_levels, c: int, u: torch.Tensor, temperature: float):
        return draw(self.channel_logits(pixel, pixel_levels, c), u, temperature)


class DiscretizedLogisticMixture:
    """PixelCNN++'s output: a mixture of ``nr_mix`` logistics per pixel, discretized to ``levels`` values.

    Parameters per pixel (``num_params = nr_mix * (1 + 2 C + C (C - 1) / 2)``: 3 K gray, 10 K RGB):
    ``[mixture logits K | means C x K | log scales C x K | coefficients C (C - 1) / 2 x K]``. Level v is
    the value x = 2 v / (levels - 1) - 1 in [-1, 1] with a bin of half-width 1 / (levels - 1); the
    lowest and highest levels take the logistic's whole tails, so the probabilities of all levels sum to 1.
    As in openai/pixel-cnn, log scales are clamped at -7 and coefficients squashed by tanh, and within a
    pixel the component means of G and B move linearly with the values of the channels before them:
    mean_G = mu_G + a x_R, mean_B = mu_B + b x_R + g x_G (coefficient pairs (G,R), (B,R), (B,G)).

    One mixture component is shared by a pixel's channels: p(x) = sum_k pi_k prod_c p_k(x_c | x_<c). So
    the conditional of channel c is a mixture whose weights are the component posteriors given the
    channels before it; ``log_prob`` and ``channel_logits`` both compute exactly that, and their sum over
    channels is the joint.
    """

    MIN_LOG_SCALE = -7.0

    def __init__(self, nr_mix: int, channels: int, levels: int = 256):
        self.nr_mix, self.channels, self.levels = nr_mix, channels, levels

    @property
    def num_pairs(self) -> int:
        return self.channels * (self.channels - 1) // 2

    def num_params(self, channels: int | None = None) -> int:
        c = self.channels if channels is None else channels
        return self.nr_mix * (1 + 2 * c + c * (c - 1) // 2)

    def unpack(self, params: torch.Tensor):
        """``params [B, P, *S]`` -> (mixture logits [B, K, *S], means, log scales [B, C, K, *S], coefficients
        [B, C (C - 1) / 2, K, *S])."""
        k, c = self.nr_mix, self.channels
        if params.shape[1] != self.num_params():
            raise ValueError(f"expected {self.num_params()} mixture parameters per pixel ({k} logistics, {c} channels), "
                             f"got {params.shape[1]}")
        logits = params[:, :k]
        means = params[:, k:k + c * k].unflatten(1, (c, k))
        log_scales = params[:, k + c * k:k + 2 * c * k].unflatten(1, (c, k)).clamp(min=self.MIN_LOG_SCALE)
        coeffs = torch.tanh(params[:, k + 2 * c * k:].unflatten(1, (self.num_pairs, k)))
        return logits, means, log_scales, coeffs

    def value(self, levels: torch.Tensor, dtype) -> torch.Tensor:
        """Level v -> its bin centre 2 v / (levels - 1) - 1 in [-1, 1]."""
        return levels.to(dtype) * (2.0 / (self.levels - 1)) - 1

    def component_log_prob(self, levels, x, mean, log_scale) -> torch.Tensor:
        """log P(level) under one discretized logistic (broadcasting): the logistic's mass on the level's bin.

        Exact and stable in both tails: sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a - b)), so its
        log is logsigmoid(b) + logsigmoid(-a) + log(-expm1(a - b)), with a - b = -2 half / s computed directly
        (no difference of two nearly equal CDFs). The lowest level keeps only the first term (its bin
        reaches -inf), the highest only the second (its bin reaches +inf).
        """
        half = 1.0 / (self.levels - 1)
        inv_scale = torch.exp(-log_scale)
        centred = x - mean
        log_cdf_upper = F.logsigmoid(inv_scale * (centred + half))
        log_sf_lower = F.logsigmoid(-inv_scale * (centred - half))
        # log(1 - e^-w), w = b - a = 2 half / s. A huge scale makes w underflow to 0 (log 0 = -inf, though each
        # inner bin's mass, about pdf x w, is > 0): below 1e-3 use the series log w - w/2 + w^2/24 (error < w^4/2880, beyond
        # float64's precision), from log w computed without the exp; the other branch gets a safe w (no NaN
        # gradient through torch.where's unused side).
        log_w = math.log(2 * half) - log_scale
        w = torch.exp(log_w)
        small = w < 1e-3
        log_width = torch.where(small, log_w - w / 2 + w * w / 24,
                                torch.log(-torch.expm1(-torch.where(small, torch.ones_like(w), w))))
        zero = torch.zeros((), dtype=log_cdf_upper.dtype, device=log_cdf_upper.device)
        # torch.where, not masking by multiplication: the unused branches are finite, so no NaN gradients.
        below_top, above_bottom = levels < self.levels - 1, levels > 0
        return (torch.where(below_top, log_cdf_upper, zero) + torch.where(above_bottom, log_sf_lower, zero)
                + torch.where(below_top & above_bottom, log_width, zero))

    def _mean(self, means, coeffs, x_before, c: int) -> torch.Tensor:
        """Component means of channel c: mu_c plus the coefficients times the values of channels < c."""
        mean = means[:, c]
        for before in range(c):
            mean = mean + coeffs[:, c * (c - 1) // 2 + before] * x_before[before]
        return mean

    def log_prob(self, params: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        if params.dim() != levels.dim() or levels.shape[1] != self.channels:
            raise ValueError(f"expected mixture parameters [B, {self.num_params()}, H, W] for levels "
                             f"[B, {self.channels}, H, W], got {list(params.shape)} and {list(levels.shape)}")
        logits, means, log_scales, coeffs = self.unpack(params)
        x = self.value(levels, params.dtype).unsqueeze(2)  # [B, C, 1, *S]: broadcasts over components
        levels = levels.unsqueeze(2)
        # prefix: log pi_k + sum over channels so far of log p_k(x_c | x_<c), [B, K, *S]
        prefix = torch.log_softmax(logits, 1)
        before = torch.logsumexp(prefix, 1)  # 0 up to rounding; subtracted so each channel is a conditional
        out = []
        for c in range(self.channels):
            mean = self._mean(means, coeffs, x.unbind(1), c)
            prefix = prefix + self.component_log_prob(levels[:, c], x[:, c], mean, log_scales[:, c])
            now = torch.logsumexp(prefix, 1)
            out.append(now - before)
            before = now
        return torch.stack(out, 1)

    def channel_logits(self, pixel: torch.Tensor, pixel_levels: torch.Tensor, c: int) -> torch.Tensor:
        """log p(v | channels < c of this pixel) for every level v, from ``pixel [B, P]`` and the pixel's
        drawn levels ``[B, C]`` (channels >= c ignored): the mixture weighted by the component posteriors."""
        logits, means, log_scales, coeffs = self.unpack(pixel)
        x = self.value(pixel_levels, pixel.dtype)[:, :, None].unbind(1)  # per channel [B, 1]
        prefix = torch.log_softmax(logits, 1)  # [B, K]
        for before in range(c):
            mean = self._mean(means, coeffs, x, before)
            prefix = prefix + self.component_log_prob(pixel_levels[:, before, None], x[before], mean,
                                                      log_scales[:, before])
        values = torch.arange(self.levels, device=pixel.device)
        mean = self._mean(means, coeffs, x, c)
        table = self.component_log_prob(values, self.value(values, pixel.dtype), mean[:, :, None],
                                         log_scales[:, c, :, None])  # [B, K, levels]
        return torch.logsumexp(prefix[:, :, None] + table, 1) - torch.logsumexp(prefix, 1)[:, None]

    def sample(self, pixel, pixel_levels, c: int, u: torch.Tensor, temperature: float):
        return draw(self.channel_logits(pixel, pixel_levels, c), u, temperature)
