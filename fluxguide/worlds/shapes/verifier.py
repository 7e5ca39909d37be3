"""An exact, programmatic verifier: does an image show what its shapes-world prompt says?

It segments the image into coloured connected components and checks count, colour, kind and relation.
It reads pixels, not render metadata, so it works on generated images: a pixel is foreground when its
brightest channel exceeds ``FOREGROUND``, its colour is the palette colour of nearest chromaticity, and
components smaller than ``MIN_AREA`` pixels are ignored as noise. A component's kind comes from two shape
statistics of its pixel mask: bars are twice as wide as tall; triangles (apex up) are much narrower in the top
quarter of their bounding box than in the bottom quarter and have their centroid at 2/3 of their height;
circles are as wide as tall and fill about pi/4 of their box. A component that fits none of these is of kind
"unknown" and matches nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluxguide.worlds.shapes.scenes import COLORS, ShapeSpec, parse_prompts

FOREGROUND = 0.4
MIN_AREA = 10
_PALETTE = torch.tensor(list(COLORS.values()))
_CHROMA = _PALETTE / _PALETTE.amax(dim=1, keepdim=True)
ATTRIBUTES = ("count", "color", "kind", "position")


@dataclass(frozen=True)
class Component:
    """A connected region of one colour: its colour, kind, area, centroid (x, y) and bounding box."""

    color: str
    kind: str
    area: int
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


@dataclass
class VerificationResult:
    """Per image: ``passed`` (bool ``(B,)``), ``scores`` (attribute -> float ``(B,)`` in [0, 1]) and the
    components found."""

    passed: torch.Tensor
    scores: dict[str, torch.Tensor]
    components: list[list[Component]]

    @property
    def accuracy(self) -> float:
        return float(self.passed.float().mean())


def classify_kind(fill: float, taper: float, centroid: float, aspect: float) -> str:
    """Kind of a component from its fill of the bounding box, top/bottom taper, relative centroid height and
    aspect (bounding-box width over height).

    Thresholds sit between the ranges measured on 980 renders of each kind at every size and place the world
    draws (fill: circle 0.65-0.82, bar 0.94-1.0, triangle 0.50-0.64; taper: circle >= 0.57, bar 0.82-1.22,
    triangle <= 0.27; centroid: circle/bar 0.46-0.54, triangle 0.62-0.66; aspect: circle/triangle 0.90-1.11,
    bar 1.67-2.40). A bar with rounded corners (fill from 0.7) is still a bar: it is the only wide kind.
    """
    if aspect >= 1.45:
        return "bar" if fill >= 0.7 and 0.6 <= taper <= 1.6 else "unknown"
    if aspect < 0.7:
        return "unknown"
    if taper < 0.45 and centroid > 0.575:
        return "triangle"
    if 0.62 <= fill < 0.9 and taper >= 0.5 and centroid <= 0.56 and aspect <= 1.3:
        return "circle"
    return "unknown"


def label_components(classes: torch.Tensor) -> torch.Tensor:
    """Connected components (4-connectivity) of each non-zero class in a batch of class maps ``(B, H, W)``.

    Label propagation: every foreground pixel starts with a unique id and repeatedly takes the largest id
    among its same-class neighbours until nothing changes; ids are then per-component. Background is 0.
    """
    b, h, w = classes.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.long).view(1, h, w).expand(b, h, w)
    labels = torch.where(classes > 0, ids, torch.zeros_like(ids))
    pad_cls = F.pad(classes, (1, 1, 1, 1), value=-1)
    shifts = [(0, 1), (2, 1), (1, 0), (1, 2)]
    same = [pad_cls[:, dy : dy + h, dx : dx + w] == classes for dy, dx in shifts]
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        new = labels
        for (dy, dx), ok in zip(shifts, same):
            neighbour = padded[:, dy : dy + h, dx : dx + w]
            new = torch.maximum(new, torch.where(ok, neighbour, torch.zeros_like(neighbour)))
        new = torch.where(classes > 0, new, torch.zeros_like(new))
        if torch.equal(new, labels):
            return labels
        labels = new


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """Class map ``(B, H, W)``: 0 background, ``1 + i`` for the i-th palette colour."""
    bright = images.amax(dim=1)
    chroma = images / bright.clamp_min(1e-6).unsqueeze(1)
    dist = ((chroma.unsqueeze(1) - _CHROMA.view(1, -1, 3, 1, 1).to(images)) ** 2).sum(2)
    return torch.where(bright > FOREGROUND, dist.argmin(1) + 1, torch.zeros_like(bright, dtype=torch.long))


def find_components(images: torch.Tensor) -> list[list[Component]]:
    """The coloured components of each image ``(B, 3, H, W)`` in [0, 1], largest first."""
    classes = classify_pixels(images.detach().float().cpu())
    labels = label_components(classes)
    names = list(COLORS)
    out: list[list[Component]] = []
    for b in range(images.shape[0]):
        comps = []
        for lab in labels[b].unique():
            if lab == 0:
                continue
            ys, xs = torch.nonzero(labels[b] == lab, as_tuple=True)
            area = ys.numel()
            if area < MIN_AREA:
                continue
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            bh, bw = y1 - y0 + 1, x1 - x0 + 1
            quarter = max(1, round(bh / 4))
            top = int((ys < y0 + quarter).sum())
            bottom = int((ys > y1 - quarter).sum())
            fill = area / (bh * bw)
            taper = top / max(bottom, 1)
            centroid = (float(ys.float().mean()) + 0.5 - y0) / bh
            kind = classify_kind(fill, taper, centroid, bw / bh)
            color = names[int(classes[b, ys[0], xs[0]]) - 1]
            comps.append(Component(color, kind, area, float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5,
                                   (x0, y0, x1, y1)))
        out.append(sorted(comps, key=lambda c: -c.area))
    return out


def _relation_holds(a: Component, b: Component, relation: str) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "left":
        return dx > 0 and abs(dx) > abs(dy)
    return dy > 0 and abs(dy) > abs(dx)


def _match(objects: tuple[ShapeSpec, ...], comps: list[Component]) -> tuple[float, float, tuple[Component, ...] | None]:
    """Best assignment of components to objects: (colour score, kind score, assigned components)."""
    best = (0.0, 0.0, None)
    k = min(len(objects), len(comps))
    if k == 0:
        return best
    for perm in itertools.permutations(comps, k):
        color = sum(o.color == c.color for o, c in zip(objects, perm)) / len(objects)
        kind = sum(o.kind == c.kind for o, c in zip(objects, perm)) / len(objects)
        if color + kind > best[0] + best[1]:
            best = (color, kind, perm)
    return best


def verify(images: torch.Tensor, prompts: list[str]) -> VerificationResult:
    """Check each image against its prompt.

    Args:
        images: ``(B, 3, H, W)`` floats in [0, 1] (rendered or generated).
        prompts: ``B`` shapes-world captions.

    Returns:
        :class:`VerificationResult`; an image passes when the number of components equals the number of
        objects and there is an assignment under which every colour, kind and the relation are right.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"verify needs images (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"verify got {len(prompts)} prompts for {images.shape[0]} images: pass one prompt per image")
    specs = parse_prompts(list(prompts))
    components = find_components(images)
    scores = {a: torch.zeros(len(prompts)) for a in ATTRIBUTES}
    passed = torch.zeros(len(prompts), dtype=torch.bool)
    for i, (spec, comps) in enumerate(zip(specs, components)):
        count_ok = len(comps) == len(spec.objects)
        scores["count"][i] = float(count_ok)
        color, kind, assigned = _match(spec.objects, comps)
        position = 0.0
        if count_ok and spec.relation is None:
            position = 1.0
        elif count_ok and assigned is not None:
            # Identical objects ("a red circle above a red circle") match in either order: the relation
            # holds if it holds for any assignment that matches colours and kinds exactly.
            exact = [p for p in itertools.permutations(comps, 2)
                     if all(o.color == c.color and o.kind == c.kind for o, c in zip(spec.objects, p))]
            position = float(any(_relation_holds(p[0], p[1], spec.relation) for p in (exact or [assigned])))
        scores["color"][i], scores["kind"][i], scores["position"][i] = color, kind, position
        passed[i] = count_ok and color == 1.0 and kind == 1.0 and position == 1.0
    return VerificationResult(passed=passed, scores=scores, components=components)
