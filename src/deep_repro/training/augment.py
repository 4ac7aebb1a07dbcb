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


def hflip_mean(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation (`postprocess.tta: hflip`): the mean logits of each image and its
    mirror image, `x` being a normalised batch `[N, 1, 28, 28]`."""
    return (net(x) + net(x.flip(-1))) * 0.5


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
