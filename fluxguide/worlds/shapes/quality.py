"""The shapes world's image-quality score: the target the aesthetic head learns to predict.

``quality = (crisp + clean + centred) / 3``, each in [0, 1]:

- **crisp**: fraction of pixels within RGB distance 0.25 of a palette colour or the black background
  (flat, clean colours rather than smudges and mixed tones);
- **clean**: one minus the mean brightness of background pixels relative to the foreground threshold
  (a dark, noise-free background);
- **centred**: one minus the distance of the foreground's centre of mass from the image centre, over the
  half diagonal (a centred composition).
"""

from __future__ import annotations

import torch

from fluxguide.worlds.shapes.scenes import COLORS
from fluxguide.worlds.shapes.verifier import FOREGROUND

_REFERENCE = torch.tensor([(0.0, 0.0, 0.0), *COLORS.values()])


def quality_components(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three components of :func:`quality_score`, each ``(B,)``."""
    x = images.float()
    h, w = x.shape[-2:]
    dist = (x.unsqueeze(1) - _REFERENCE.view(1, -1, 3, 1, 1).to(x)).norm(dim=2).amin(1)
    crisp = (dist < 0.25).float().mean((1, 2))
    bright = x.amax(1)
    bg = bright <= FOREGROUND
    bg_level = (bright * bg).sum((1, 2)) / bg.sum((1, 2)).clamp_min(1)
    clean = 1 - (bg_level / FOREGROUND).clamp(0, 1)
    fg = (bright > FOREGROUND).float()
    mass = fg.sum((1, 2)).clamp_min(1)
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w) + 0.5
    cy, cx = (fg * ys).sum((1, 2)) / mass, (fg * xs).sum((1, 2)) / mass
    d = ((cy - h / 2) ** 2 + (cx - w / 2) ** 2).sqrt() / ((h / 2) ** 2 + (w / 2) ** 2) ** 0.5
    centred = torch.where(fg.sum((1, 2)) > 0, 1 - d, torch.zeros_like(d))
    return {"crisp": crisp, "clean": clean, "centred": centred}


def quality_score(images: torch.Tensor) -> torch.Tensor:
    """Image quality in [0, 1] of images ``(B, 3, H, W)`` in [0, 1] (see the module docstring)."""
    c = quality_components(images)
    return (c["crisp"] + c["clean"] + c["centred"]) / 3


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly blurred, noisy, tinted versions of images: a spread of qualities to train the head on."""
    b = images.shape[0]
    r = lambda: torch.rand(b, 1, 1, 1, generator=generator)
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    x = images + r() * (blur - images)
    x = x + r() * 0.3 * torch.randn(x.shape, generator=generator)
    x = x + r() * 0.3 * torch.rand(b, 3, 1, 1, generator=generator)
    return x.clamp(0, 1)
