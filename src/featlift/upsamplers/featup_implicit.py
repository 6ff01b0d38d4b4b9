"""FeatUp's implicit upsampler (Fu et al., ICLR 2024, ``train_implicit_upsampler.py``): one network fitted per image.

For one image (the normalised ``H x W`` picture the backbone saw, ``guide="input"``) with backbone tokens on an
``h x w`` grid, the method fits, at test time, a small per-pixel network

    F(y, x) = MLP(Fourier(y, x, rgb(y, x)))  in a ``d``-dimensional PCA space of the image's features,

and returns ``unproject(F)`` (``C`` channels) at any output size. What it computes (checked against the
official code: ``layers.py`` ``ImplicitFeaturizer``/``MinMaxScaler``/``ChannelNorm``, ``downsamplers.py``,
``datasets/JitteredImage.py``, ``losses.py``, ``util.py`` ``PCAUnprojector``, ``configs/implicit_upsampler.yaml``):

- inputs per pixel: its coordinates ``(y, x)`` in ``[-1, 1]`` and its colour, min-max scaled per channel over the
  fitted image to ``[-0.5, 0.5]`` (``MinMaxScaler``; the scale is kept, so any resolution uses the same one);
- Fourier features (`FourierFeatures`): for 30 frequencies ``exp(linspace(-2, 10, 30))`` and the 5 inputs,
  ``sin(f * v + a)`` and ``cos(f * v + b)`` with learned phases ``a, b`` (``learn_bias=True``, initialised
  standard normal), plus the 3 scaled colours: ``2 * 30 * 5 + 3 = 303`` values;
- the MLP (`ImplicitNetwork`): LayerNorm(303), Dropout2d(0.2), Linear(303 -> d), ReLU, Dropout2d(0.2),
  LayerNorm(d), Linear(d -> d), ReLU, Linear(d -> d), ``d = proj_dim = 128``; the dropouts drop whole channels
  of the image (one mask per step), only while fitting;
- ``unproject``: the PCA of the jittered views' features (fitted on the first 50 views, centred), ``F @ V + mean``.

The fit (`fit_image`), with everything random drawn from a generator seeded by the image's pixels and ``seed``:

1. ``views`` jitters of the image (FeatUp's ``sample_transform``): reflect pad 30 px of 224 (``max_pad: 30``),
   zoom 1 or, half the time, uniform in [1, 1.8] (``max_zoom``), a crop of the original size at a uniform
   offset, a left-right flip half the time (``use_flips``). Each is a `featlift.train.views.View` and is applied
   by `featlift.train.augment.jitter_features`, the jitter of FeatUp's JBU objective, to the image (then given
   to the backbone through the pipeline's ``features_of``) and to the upsampled map alike;
2. per step (``steps``, NAdam at ``lr`` 2e-3 over the network, the downsampler and the uncertainty head):
   ``F`` at the fitted image's ``H x W`` pixels, ``[|F|, F]`` (its magnitude as an extra channel), and for each of
   ``jitters_per_step`` views drawn with replacement, a learned downsampler ``D`` of the jittered ``[|F|, F]``
   back to the token grid, against the view's PCA-projected tokens ``t``:

       loss = mean over views of  mean(err / (2 s²) + log s) + 0.001 * mean((D(J([|F|, F]))_0 - |t|)²)
              + 0.05 * TV(|F|) + 0.1 * mean((blur(F) - F)²),
       err = (D(J([|F|, F]))_1: - t)²,  s = UncertaintyScale(t)

   (``outlier_detection``, ``mag_weight``, ``mag_tv_weight``, ``blur_pin``; TV as FeatUp's ``total_variation``:
   the summed squared neighbour differences over the element count; blur: 5x5 Gaussian, sigma 1; `UncertaintyScale`,
   `weighted_error` and `gaussian_blur` are those of FeatUp's JBU objective, `featup_downsampler`).
   ``D`` is ``downsampler="simple"`` (default; FeatUp's ``SimpleDownsampler``: one learned ``k x k`` kernel
   ``|w| / sum |w|``, `KernelDownsampler`) or ``"attention"`` (FeatUp's default, `featup_downsampler.AttentionDownsampler`
   on ``d + 1`` channels). Its window is ``k = patch + 2 * ceil(patch / 2)`` (`window_size`, 28 at patch 14) on the
   jittered map reflect-padded by ``ceil(patch / 2)``, so its stride ``(H + 2m - k) // (h - 1)`` is the patch and
   each window is centred on its token.
   The gradient is the official one; it is accumulated view by view through the map ``[|F|, F]`` and then sent
   through the network once, so the memory is that of one view, not of ``jitters_per_step``.
3. The output: the network in evaluation mode at every output pixel (coordinates of the output grid, colours of
   the guide resized bilinearly to it), computed in chunks of output pixels straight into the output
   (``chunk_size`` / ``max_memory_mib``, ``output_dtype``: `chunking`). The native output is one feature per
   input pixel (the grid times the patch), as FeatUp's.

Where it differs from the official code (config ``implicit_upsampler.yaml``):

- defaults for a CPU: ``steps`` 50 (official 1200), ``views`` 32 (3000), ``jitters_per_step`` 2 (10),
  ``downsampler`` ``simple`` (``attention``): on a CPU one attention view at 224 px costs ~13 s forward and
  backward (it unfolds ``129 x 28² x 256`` patches), a simple one ~1 s, the MLP at 224² pixels ~5 s per step,
  so the official settings take many hours per image; they stay reachable (``--steps 1200 --option views=3000
  --option jitters_per_step=10 --option downsampler=attention``);
- the downsampling windows are centred on their tokens (above); FeatUp's ``k = 29`` without padding has stride
  ``(224 - 29) // 15 = 13`` for DINOv2's 14 px tokens, so its windows drift up to half a patch off their tokens;
- pixel coordinates are pixel centres ``-1 + (2i + 1) / H`` (official ``linspace(-1, 1, H)``), so that a map at
  another resolution samples the same places; the learned phases are stored ``[2, frequencies, 5]`` (the
  official stores ``[2, 5, frequencies]`` and reshapes it, a different but equally random parametrisation);
- jitter offsets are continuous fractions of the image (official: whole pixels of the zoomed image), the
  zoom is applied by sampling (`jitter_features`) rather than ``F.interpolate(scale_factor=zoom)``;
- the PCA is exact (SVD) instead of ``torch.pca_lowrank(niter=4)``; with ``proj_dim >= C`` no PCA is used and
  the output has ``C`` channels, the MLP's width staying ``proj_dim``;
- the backbone's output is not ChannelNorm'd (the latest config's ``use_norm: false``): the output lives in the
  backbone's own feature space, as every featlift method's does;
- the attention downsampler's logit mask is drawn as in `AttentionDownsampler` (training mode throughout the fit).

Parameters fitted per image at C=384 (d=128): network 73,098 (phases 300, LayerNorms 606 + 256, linears
38,912 + 16,512 + 16,512; counted from the official architecture, the paper gives none), downsampler 784
(simple) or 129 + 1 + 2 x 784 = 1,698 (attention), uncertainty head 129. Nothing of a fit is kept in the module.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .base import Capabilities, FeaturesOf, Upsampler, check_inputs
from .chunking import chunk_length, chunk_slices, output_dtype, set_chunking
from .registry import register_upsampler

FREQUENCIES = 30
LOG_FREQUENCY_RANGE = (-2.0, 10.0)  # frequencies exp(linspace(-2, 10, FREQUENCIES))
INPUTS = 5  # y, x, r, g, b
DROPOUT = 0.2
PCA_VIEWS = 50  # the views the PCA is fitted on (``pca_batch``)
MAX_PAD = 30 / 224  # reflect padding, a fraction of the side (``max_pad: 30`` px of 224)
MAX_ZOOM = 1.8
MAGNITUDE_WEIGHT = 0.001
MAGNITUDE_TV_WEIGHT = 0.05
BLUR_PIN_WEIGHT = 0.1
VIEW_BATCH = 8  # jittered views given to the backbone at once


def fourier_width(frequencies: int = FREQUENCIES) -> int:
    """The number of Fourier features: sin and cos of every (frequency, input), plus the 3 colours."""
    return 2 * frequencies * INPUTS + 3


class FourierFeatures(nn.Module):
    """``[P, 5]`` rows ``(y, x, r, g, b)`` -> ``[P, 2 * frequencies * 5 + 3]``: sines and cosines with learned phases."""

    def __init__(self, frequencies: int = FREQUENCIES):
        super().__init__()
        low, high = LOG_FREQUENCY_RANGE
        self.register_buffer(
            "frequencies", torch.exp(torch.linspace(low, high, frequencies)), persistent=False
        )
        self.phases = nn.Parameter(torch.randn(2, frequencies, INPUTS))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        scaled = inputs[:, None, :] * self.frequencies[None, :, None]  # [P, frequencies, 5]
        sines = torch.sin(scaled + self.phases[0]).flatten(1)
        cosines = torch.cos(scaled + self.phases[1]).flatten(1)
        return torch.cat([sines, cosines, inputs[:, 2:]], dim=1)


class ImplicitNetwork(nn.Module):
    """One image's implicit model: pixel inputs -> Fourier features -> MLP -> ``dims`` features; see the module doc.

    ``color_low``/``color_range`` hold the min-max scaling of the fitted image's colours, the PCA ``components``
    ``[dims, C]`` and ``mean`` ``[C]`` map the output back to the backbone's channels (identity when None).
    """

    def __init__(self, dims: int, hidden: int | None = None, frequencies: int = FREQUENCIES):
        super().__init__()
        width = fourier_width(frequencies)
        self.fourier = FourierFeatures(frequencies)
        self.input_norm = nn.LayerNorm(width)
        hidden = dims if hidden is None else hidden
        self.first = nn.Linear(width, hidden)
        self.hidden_norm = nn.LayerNorm(hidden)
        self.second = nn.Linear(hidden, hidden)
        self.third = nn.Linear(hidden, dims)
        self.fit_losses: list[float] = []  # the loss of every fitting step
        self.register_buffer("color_low", torch.zeros(3))
        self.register_buffer("color_range", torch.ones(3))
        self.components: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None

    def set_color_scale(self, image: torch.Tensor) -> None:
        """FeatUp's ``MinMaxScaler`` statistics of `image` ``[1, 3, H, W]`` (per channel, range at least 1e-4)."""
        flat = image.detach().transpose(0, 1).flatten(1)
        self.color_low = flat.amin(1)
        self.color_range = (flat.amax(1) - self.color_low).clamp_min(1e-4)

    def pixel_inputs(self, image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``[P, 5]`` inputs of the pixels ``(rows, cols)`` of `image` ``[1, 3, H, W]`` (pixel-centre coordinates)."""
        height, width = image.shape[-2:]
        y = (2 * rows.to(image.dtype) + 1) / height - 1
        x = (2 * cols.to(image.dtype) + 1) / width - 1
        colors = image[0][:, rows, cols].transpose(0, 1)
        colors = (colors - self.color_low) / self.color_range - 0.5
        return torch.cat([y[:, None], x[:, None], colors], dim=1)

    def forward(
        self, inputs: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``[P, 5]`` -> ``[P, dims]``; `masks` are the two Dropout2d channel masks (scaled by 1/(1-p)) of a fit step."""
        hidden = self.input_norm(self.fourier(inputs))
        if masks is not None:
            hidden = hidden * masks[0]
        hidden = F.relu(self.first(hidden))
        if masks is not None:
            hidden = hidden * masks[1]
        hidden = F.relu(self.second(self.hidden_norm(hidden)))
        return self.third(hidden)

    def dropout_masks(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Dropout2d channel mask per layer for the whole image, drawn from the global generator."""
        shapes = (self.input_norm.normalized_shape[0], self.first.out_features)
        return tuple(F.dropout(like.new_ones(n), DROPOUT, training=True) for n in shapes)  # type: ignore[return-value]

    def unproject(self, features: torch.Tensor) -> torch.Tensor:
        """``[P, dims]`` -> ``[P, C]``: back from the PCA space (unchanged without one)."""
        if self.components is None:
            return features
        return features @ self.components + self.mean


class KernelDownsampler(nn.Module):
    """FeatUp's ``SimpleDownsampler``: one learned ``k x k`` kernel (``|w| / sum |w|``, initialised uniform) applied
    to every channel with the stride that fits ``k x k`` patches to the token grid, ``(H - k) // (h - 1)``."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = int(kernel)
        self.weights = nn.Parameter(torch.ones(kernel, kernel))

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, channels, height, width = features.shape
        k = self.kernel
        strides = [
            (size - k) // (cells - 1) if cells > 1 else k
            for size, cells in zip((height, width), grid, strict=True)
        ]
        if min(strides) < 1:
            raise ValueError(
                f"kernel downsampler: a {height}x{width} map does not cover a {grid} grid of {k}x{k}"
            )
        weights = self.weights.abs()
        weights = (weights / weights.sum())[None, None]
        flat = features.reshape(batch * channels, 1, height, width)
        down = F.conv2d(flat, weights, stride=tuple(strides))[..., : grid[0], : grid[1]]
        return down.reshape(batch, channels, *grid)


DOWNSAMPLERS = ("attention", "simple")


def image_seed(image: torch.Tensor, seed: int) -> int:
    """A seed from the pixels of `image` and `seed`: the same picture gives the same fit wherever it is in a batch."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(str(int(seed)).encode() + b"/" + data).hexdigest()
    return int(digest[:15], 16)


def draw_jitters(count: int, generator: torch.Generator) -> list:
    """`count` FeatUp jitters (pad, zoom, offset, flip) as `featlift.train.views.View` objects."""
    from ..train.views import View

    views = []
    for index in range(count):
        flip, zoom_on, zoom_draw, top_draw, left_draw = torch.rand(
            5, generator=generator, dtype=torch.float64
        )
        zoom = 1.0 + float(zoom_draw) * (MAX_ZOOM - 1.0) if zoom_on > 0.5 else 1.0
        side = 1.0 / zoom
        span = 1.0 + 2 * MAX_PAD - side - 1e-9
        top, left = -MAX_PAD + float(top_draw) * span, -MAX_PAD + float(left_draw) * span
        views.append(
            View(f"jitter{index}", zoom, crop=(top, left, side, side), pad=MAX_PAD, flip=bool(flip > 0.5))
        )
    return views


def fit_pca(features: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(components [dims, C], mean [C])`` of the centred tokens of `features` ``[N, C, h, w]``; None if
    ``dims >= C`` (no projection)."""
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    if dims >= rows.shape[1]:
        return None
    mean = rows.mean(0)
    _, _, basis = torch.linalg.svd(rows - mean, full_matrices=False)
    return basis[:dims].to(features.dtype), mean.to(features.dtype)


def project_tokens(features: torch.Tensor, pca: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if pca is None:
        return features
    components, mean = pca
    return torch.einsum("nchw,dc->ndhw", features - mean[:, None, None], components)


def window_margin(patch_size: int) -> int:
    """How far a downsampling window reaches past its token's patch on each side: half a patch, rounded up."""
    return -(-int(patch_size) // 2)


def window_size(patch_size: int) -> int:
    """The side of the downsampling window of a token: its patch plus `window_margin` on each side (28 at patch
    14; FeatUp: 29). With the jittered map reflect-padded by the margin, the downsamplers' stride
    ``(H + 2m - k) // (h - 1)`` is exactly the patch and every window is centred on its token."""
    return int(patch_size) + 2 * window_margin(patch_size)


def downsample_to_tokens(downsampler: nn.Module, features: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`features` ``[B, C, H, W]`` at pixel resolution -> ``[B, C, H / patch, W / patch]`` through `downsampler`,
    on the map reflect-padded by `window_margin` so that each window is centred on its token."""
    grid = (features.shape[-2] // patch_size, features.shape[-1] // patch_size)
    margin = window_margin(patch_size)
    return downsampler(F.pad(features, [margin] * 4, mode="reflect"), grid)


def magnitude(features: torch.Tensor) -> torch.Tensor:
    return features.square().sum(1, keepdim=True).sqrt()


def total_variation(features: torch.Tensor) -> torch.Tensor:
    """FeatUp's ``total_variation``: summed squared differences of vertical and horizontal neighbours / numel."""
    vertical = (features[:, :, 1:] - features[:, :, :-1]).square().sum()
    horizontal = (features[:, :, :, 1:] - features[:, :, :, :-1]).square().sum()
    return (vertical + horizontal) / features.numel()


@register_upsampler("featup-implicit")
class FeatUpImplicit(Upsampler):
    """FeatUp's implicit upsampler, fitted on each image at test time; see the module docstring."""

    capabilities = Capabilities(guide="input", output_sizes="any", fitting="per-image")
    options = (
        "steps",
        "lr",
        "views",
        "jitters_per_step",
        "proj_dim",
        "downsampler",
        "seed",
        "chunk_size",
        "max_memory_mib",
        "output_dtype",
    )
    show_progress: bool = False  # a tqdm bar over each image's steps (the CLI sets it; not an option)

    def __init__(
        self,
        channels: int,
        patch_size: int,
        steps: int = 50,
        lr: float = 2e-3,
        views: int = 32,
        jitters_per_step: int = 2,
        proj_dim: int = 128,
        downsampler: str = "simple",
        seed: int = 0,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("steps", steps),
            ("views", views),
            ("jitters_per_step", jitters_per_step),
            ("proj_dim", proj_dim),
            ("channels", channels),
            ("patch_size", patch_size),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"featup-implicit {name} must be a whole number >= 1, got {value!r}")
        if downsampler not in DOWNSAMPLERS:
            raise ValueError(
                f"featup-implicit downsampler {downsampler!r}: expected one of {', '.join(DOWNSAMPLERS)}"
            )
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"featup-implicit lr must be > 0 and finite, got {lr!r}")
        self.channels, self.patch_size = int(channels), int(patch_size)
        self.steps, self.lr, self.views = int(steps), float(lr), int(views)
        self.jitters_per_step, self.proj_dim, self.seed = int(jitters_per_step), int(proj_dim), int(seed)
        self.downsampler = downsampler
        set_chunking(self, "featup-implicit", chunk_size, max_memory_mib, output_dtype)

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """One feature per input pixel, as FeatUp's implicit model gives: the grid times the patch."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    def fit_upsample(
        self,
        features: torch.Tensor,
        guide: torch.Tensor | None,
        output_size: tuple[int, int],
        features_of: FeaturesOf,
    ) -> torch.Tensor:
        return self(features, guide, output_size, features_of=features_of)

    def forward(
        self,
        features: torch.Tensor,
        guide: torch.Tensor | None,
        output_size: tuple[int, int],
        features_of: FeaturesOf | None = None,
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        if features_of is None:
            raise InputSizeError(
                "featup-implicit fits each image on the backbone's features of jittered views: call it through "
                "FeaturePipeline, or as fit_upsample(features, guide, output_size, features_of)"
            )
        if features.device.type == "meta":
            raise NotImplementedError("featup-implicit's per-image fit depends on the pixels (no meta run)")
        assert guide is not None
        if tuple(guide.shape[-2:]) != (
            features.shape[-2] * self.patch_size,
            features.shape[-1] * self.patch_size,
        ):
            raise InputSizeError(
                f"featup-implicit: guide {list(guide.shape[-2:])} is not the image the backbone saw for a "
                f"{features.shape[-2]}x{features.shape[-1]} grid of patch {self.patch_size}"
            )
        dtype = output_dtype(self.output_dtype, features)
        out = torch.empty(features.shape[0], features.shape[1], *size, dtype=dtype, device=features.device)
        for index in range(features.shape[0]):
            network = self.fit_image(
                features[index : index + 1], guide[index : index + 1].float(), features_of
            )
            self.evaluate_into(network, guide[index : index + 1].float(), out[index])
        return out

    def fit_image(
        self, features: torch.Tensor, image: torch.Tensor, features_of: FeaturesOf
    ) -> ImplicitNetwork:
        """The implicit network fitted on one image ``[1, 3, H, W]`` (normalised) with tokens `features`."""
        from ..train.augment import jitter_features
        from ..train.objectives.featup_downsampler import (
            AttentionDownsampler,
            UncertaintyScale,
            gaussian_blur,
        )

        seed = image_seed(image, self.seed)
        device = image.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            jitters = draw_jitters(self.views, generator)
            with torch.no_grad():
                jittered = [jitter_features(image, view) for view in jitters]
                targets = torch.cat(
                    [
                        features_of(torch.cat(jittered[start : start + VIEW_BATCH])).float()
                        for start in range(0, len(jittered), VIEW_BATCH)
                    ]
                )
                del jittered
                pca = fit_pca(targets[:PCA_VIEWS], self.proj_dim)
                targets = project_tokens(targets, pca)
            dims = targets.shape[1]
            network = ImplicitNetwork(dims, hidden=self.proj_dim).to(device)
            network.set_color_scale(image)
            kernel = window_size(self.patch_size)
            downsampler = (
                AttentionDownsampler(dims + 1, kernel)
                if self.downsampler == "attention"
                else KernelDownsampler(kernel)
            ).to(device)
            uncertainty = UncertaintyScale(dims).to(device)
            parameters = [*network.parameters(), *downsampler.parameters(), *uncertainty.parameters()]
            optimizer = torch.optim.NAdam(parameters, lr=self.lr)
            height, width = image.shape[-2:]
            rows, cols = torch.meshgrid(
                torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
            )
            inputs = network.pixel_inputs(image, rows.flatten(), cols.flatten())
            bar = None
            if self.show_progress:
                from tqdm import tqdm

                bar = tqdm(total=self.steps, unit="step", desc="featup-implicit fit", leave=False)
            downsampler.train()
            uncertainty.train()
            network.fit_losses = []
            try:
                for _ in range(self.steps):
                    upsampled = network(inputs, network.dropout_masks(inputs))
                    upsampled = upsampled.transpose(0, 1).reshape(1, dims, height, width)
                    both = torch.cat([magnitude(upsampled), upsampled], dim=1)
                    views_loss, gradient = self.multiview_loss(
                        both, targets, jitters, downsampler, uncertainty
                    )
                    regulariser = MAGNITUDE_TV_WEIGHT * total_variation(both[:, :1])
                    regulariser = (
                        regulariser + BLUR_PIN_WEIGHT * (gaussian_blur(upsampled) - upsampled).square().mean()
                    )
                    torch.autograd.backward([both, regulariser], [gradient, None])
                    network.fit_losses.append(views_loss + float(regulariser.detach()))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        network.eval()
        if pca is not None:
            network.components, network.mean = pca
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        return network

    def multiview_loss(self, both, targets, jitters, downsampler, uncertainty) -> tuple[float, torch.Tensor]:
        """The views' reconstruction and magnitude terms for ``jitters_per_step`` views drawn with replacement,
        back-propagated view by view into the downsampler and the uncertainty head; returns their value and their
        gradient with respect to `both` (``[|F|, F]``), which the caller sends on through the network."""
        from ..train.augment import jitter_features
        from ..train.objectives.featup_downsampler import weighted_error

        leaf = both.detach().requires_grad_(True)
        chosen = torch.randint(targets.shape[0], (self.jitters_per_step,)).tolist()
        total = 0.0
        for index in chosen:
            target = targets[index : index + 1]
            down = downsample_to_tokens(downsampler, jitter_features(leaf, jitters[index]), self.patch_size)
            reconstruction = weighted_error((down[:, 1:] - target).square(), uncertainty(target))
            magnitude_loss = (down[:, :1] - magnitude(target)).square().mean()
            loss = (reconstruction + MAGNITUDE_WEIGHT * magnitude_loss) / len(chosen)
            loss.backward()
            total += float(loss.detach())
        return total, leaf.grad

    def evaluate_into(self, network: ImplicitNetwork, image: torch.Tensor, out: torch.Tensor) -> None:
        """`network` at every pixel of `out` ``[C, H', W']``, the guide `image` resized bilinearly to ``H' x W'``."""
        height, width = out.shape[-2:]
        if tuple(image.shape[-2:]) != (height, width):
            shrink = height < image.shape[-2] or width < image.shape[-1]
            image = F.interpolate(
                image, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
            )
        dims = network.first.out_features
        per_pixel = 4 * (INPUTS * (1 + 4 * FREQUENCIES) + 2 * fourier_width() + 6 * dims + 2 * out.shape[0])
        length = chunk_length(height * width, per_pixel, self.chunk_size, self.max_memory_mib)
        flat = out.view(out.shape[0], height * width)
        with torch.no_grad():
            for part in chunk_slices(height * width, length):
                index = torch.arange(part.start, part.stop, device=out.device)
                inputs = network.pixel_inputs(image, index // width, index % width)
                flat[:, part] = network.unproject(network(inputs)).transpose(0, 1).to(out.dtype)

    def config(self) -> dict[str, Any]:
        return {}
