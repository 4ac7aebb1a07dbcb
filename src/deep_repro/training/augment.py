"""Data augmentation and input normalisation (config group `augment`), on whole batches.

Batches stay uint8 on the training device until the last moment: augmentation is indexing and
masking on one `[N, 28, 28]` tensor, normalisation one fused float op. The same `normalise` is
what the inference model bakes in (see `deep_repro.inference`), so training and serving agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deep_repro.config.schema import AugmentConfig, NoAugmentConfig
from deep_repro.config.task import PIXEL_MEAN, PIXEL_STD


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] or [N,1,28,28] -> float [N,1,28,28], standardised."""
    x = images_u8.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)


# Test-time augmentations (`postprocess.tta`), cheapest first. Each is the mean logits over its
# views; a view is (dy, dx, mirrored): the image moved dy pixels down and dx right (the edge it
# leaves filled with black, as the training crops pad) and optionally mirrored. The shifts are
# the translations the training crops taught the net (augment.crop_padding). The code reads
# only the shifts (`shift_kernels`): every TTA but `none` pairs each shift with its mirror.
TTA_VIEWS: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "none": ((0, 0, False),),
    "hflip": ((0, 0, False), (0, 0, True)),
    "hflip_shift": tuple(
        (dy, dx, mirrored) for dy, dx in ((0, 0), (-1, -1), (1, 1)) for mirrored in (False, True)
    ),
}
# Black (pixel 0) after `normalise`: what a shifted view's uncovered edge holds.
BLACK = -PIXEL_MEAN / PIXEL_STD


def hflip_mean(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation (`postprocess.tta: hflip`): the mean logits of each image and its
    mirror image, `x` being a normalised batch `[N, 1, 28, 28]`."""
    return (net(x) + net(x.flip(-1))) * 0.5


def shift_kernels(tta: str) -> torch.Tensor:
    """One-hot 3x3 kernels `[S, 1, 3, 3]`, one per distinct shift of `TTA_VIEWS[tta]`: a
    convolution with them moves an image by whole pixels. A convolution, not slicing, because
    the exported program may only call pure, allow-listed operators (inference.safe_archive)."""
    shifts = list(dict.fromkeys((dy, dx) for dy, dx, _ in TTA_VIEWS[tta]))
    kernels = torch.zeros(len(shifts), 1, 3, 3)
    for i, (dy, dx) in enumerate(shifts):
        kernels[i, 0, 1 - dy, 1 - dx] = 1.0  # out[r, c] = in[r - dy, c - dx]
    return kernels


def shifted_mean(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kernels: torch.Tensor
) -> torch.Tensor:
    """Mean logits over every shift of `kernels` of `x` (normalised `[N, 1, H, W]`) and of its
    mirror image: one convolution makes all the shifted copies, one batch carries them."""
    # Static sizes only (S, H, W, classes; -1 for N): an export with a dynamic batch would
    # otherwise read N at run time (aten.sym_size), which the allow-list does not admit.
    shifts, (h, w) = kernels.shape[0], x.shape[-2:]
    views = torch.nn.functional.conv2d(x - BLACK, kernels, padding=1) + BLACK  # [N, S, H, W]
    views = views.reshape(-1, 1, h, w)  # image-major: the S views of image 0, of image 1, ...
    logits = net(views) + net(views.flip(-1))
    return logits.reshape(-1, shifts, logits.shape[-1]).mean(1) * 0.5


def tta_logits(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tta: str,
    kernels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits `postprocess.tta = tta` computes for a normalised batch; `kernels`: those of
    `shift_kernels(tta)` where the caller keeps them (the inference model, as a buffer)."""
    if tta == "none":
        return net(x)
    if tta == "hflip":
        return hflip_mean(net, x)
    if kernels is None:
        kernels = shift_kernels(tta).to(x.device)
    return shifted_mean(net, x, kernels)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random translation (crop of a zero-padded image), horizontal flip, random erasing, done
    on a whole uint8 batch `[N, 28, 28]` at once on its device. Clothing stays clothing when
    mirrored, so flips are label-preserving here (they would not be for digits)."""
    if isinstance(cfg, NoAugmentConfig):
        return x
    n, h, w = x.shape
    dev = x.device
    if cfg.crop_padding > 0:
        p = cfg.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, :, None]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]
    if cfg.hflip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    if cfg.random_erasing > 0:
        erase = torch.rand(n, generator=gen, device=dev) < cfg.random_erasing
        size = torch.randint(4, 13, (n, 2), generator=gen, device=dev)
        top = (torch.rand(n, generator=gen, device=dev) * (h - size[:, 0] + 1)).long()
        left = (torch.rand(n, generator=gen, device=dev) * (w - size[:, 1] + 1)).long()
        r = torch.arange(h, device=dev)[None, :, None]
        c = torch.arange(w, device=dev)[None, None, :]
        box = (
            (r >= top[:, None, None])
            & (r < (top + size[:, 0])[:, None, None])
            & (c >= left[:, None, None])
            & (c < (left + size[:, 1])[:, None, None])
        )
        x = x.masked_fill(box & erase[:, None, None], 0)
    return x
