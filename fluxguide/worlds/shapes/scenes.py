"""The shapes world's scenes: a caption grammar, the train / held-out prompt split, and a renderer.

A scene holds one or two coloured shapes on a black 32x32 canvas. Captions follow a small grammar::

    single:  "a {color} {kind}"                          e.g. "a red circle"
    pair:    "a {color} {kind} {relation} a {color} {kind}"  relation in {"on the left of", "above"}

Pairs are placed so that the named relation dominates (``|dx| >= 2 |dy|`` for "on the left of", and the
transpose for "above"), which makes every caption either clearly true or clearly false for its image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fluxguide.backbones.base import prompt_preview

IMAGE_SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.25),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.20),
}
# Kinds differ in coarse geometry a 4x4-patch model can draw in half an hour: a bar is twice as wide as it is
# tall (aspect), a triangle (apex up) is narrow at the top. A square was tried and dropped: after 3,600 steps
# the model drew squares as discs (median fill 0.70 for both, measured on 192 samples), a 2-pixel corner
# detail below the patch size, so no sampler or guidance could make its kind right.
KINDS: tuple[str, ...] = ("circle", "bar", "triangle")
RELATIONS: dict[str, str] = {"on the left of": "left", "above": "above"}
# (color, kind) combinations that never appear in the RL training prompts (they do appear in the base
# model's pretraining captions, so the base model can draw them): generalisation is measured on them.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("green", "bar"), ("blue", "triangle")})
SINGLE_SIZES = (12, 16)  # bounding-box side in pixels, inclusive range
PAIR_SIZES = (10, 12)
# Layout: a single object sits within SINGLE_JITTER px of the centre; a pair's objects sit near the two
# anchors PAIR_ANCHORS (along the relation's axis) within PAIR_JITTER px, and within ACROSS_JITTER px of the
# centre across it. Layouts vary, but little: a 0.6M-parameter model trained for half an hour on two cores
# learns to draw kinds it can place, which keeps the base sampler in the range where guidance has headroom.
SINGLE_JITTER = 4.0
PAIR_ANCHORS = (8.75, 23.25)
PAIR_JITTER = 1.25
ACROSS_JITTER = 3.0


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a prompt: its colour and kind."""

    color: str
    kind: str

    def __str__(self) -> str:
        return f"a {self.color} {self.kind}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: one or two objects and, for two, the relation of the first to the second."""

    objects: tuple[ShapeSpec, ...]
    relation: str | None = None  # "left" or "above"

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return str(self.objects[0])
        words = {v: k for k, v in RELATIONS.items()}[self.relation]
        return f"{self.objects[0]} {words} {self.objects[1]}"


@dataclass(frozen=True)
class PlacedShape:
    """An object placed on the canvas: centre ``(cx, cy)`` and bounding-box side ``size`` in pixels."""

    spec: ShapeSpec
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    prompt: PromptSpec
    shapes: tuple[PlacedShape, ...]

    @property
    def caption(self) -> str:
        return self.prompt.caption


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a caption of the grammar; raise ``ValueError`` naming the prompt if it is not one."""
    text = " ".join(prompt.strip().lower().split())
    for words, rel in RELATIONS.items():
        sep = f" {words} "
        if sep in text:
            left, right = text.split(sep, 1)
            return PromptSpec((_parse_object(left, prompt), _parse_object(right, prompt)), rel)
    return PromptSpec((_parse_object(text, prompt),))


GRAMMAR = (
    "expected 'a <color> <kind>' optionally followed by 'on the left of' / 'above' and another object, with "
    f"colors {sorted(COLORS)} and kinds {list(KINDS)} (e.g. 'a red circle on the left of a blue bar')"
)


def _parse_object(text: str, prompt: str) -> ShapeSpec:
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("a", "an") or parts[1] not in COLORS or parts[2] not in KINDS:
        raise ValueError(f"{prompt_preview(prompt)} is not a shapes-world prompt: {GRAMMAR}")
    return ShapeSpec(parts[1], parts[2])


def parse_prompts(prompts: list[str]) -> list[PromptSpec]:
    """Parse every prompt; raise one ``ValueError`` naming (the first 60 characters of) the first few prompts
    outside the grammar, how many there are, and the grammar."""
    specs: list[PromptSpec] = []
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__} {p!r}; prompts must be strings")
        try:
            specs.append(parse_prompt(p))
        except ValueError:
            bad.append((i, p))
    if bad:
        shown = "; ".join(f"prompt {i}: {prompt_preview(p)}" for i, p in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(
            f"{len(bad)} of {len(prompts)} prompts are outside the shapes world's grammar: {shown}{more}. The "
            f"shapes world can only encode its own captions: {GRAMMAR}; see fluxguide.worlds.shapes.scenes.all_prompts()"
        )
    return specs


def all_prompt_specs() -> list[PromptSpec]:
    """Every caption of the grammar (12 singles and 288 pairs), in a fixed order."""
    objects = [ShapeSpec(c, k) for c in COLORS for k in KINDS]
    specs = [PromptSpec((o,)) for o in objects]
    specs += [PromptSpec((a, b), rel) for rel in RELATIONS.values() for a in objects for b in objects]
    return specs


def is_heldout(spec: PromptSpec) -> bool:
    return any((o.color, o.kind) in HELDOUT_COMBOS for o in spec.objects)


def all_prompts() -> list[str]:
    return [s.caption for s in all_prompt_specs()]


def train_prompts() -> list[str]:
    """Prompts the RL algorithms may train on (no held-out colour/kind combination)."""
    return [s.caption for s in all_prompt_specs() if not is_heldout(s)]


def heldout_prompts() -> list[str]:
    """Prompts that contain a held-out colour/kind combination: the evaluation set."""
    return [s.caption for s in all_prompt_specs() if is_heldout(s)]


def sample_prompt_spec(rng: np.random.Generator, single_fraction: float = 1 / 3) -> PromptSpec:
    """A random prompt: a single object with probability ``single_fraction``, else a pair."""
    def obj() -> ShapeSpec:
        return ShapeSpec(list(COLORS)[rng.integers(len(COLORS))], KINDS[rng.integers(len(KINDS))])

    if rng.random() < single_fraction:
        return PromptSpec((obj(),))
    return PromptSpec((obj(), obj()), list(RELATIONS.values())[rng.integers(len(RELATIONS))])


def place(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """Place the objects of ``spec`` on the canvas at random, respecting its relation."""
    mid = IMAGE_SIZE / 2
    if len(spec.objects) == 1:
        s = float(rng.integers(SINGLE_SIZES[0], SINGLE_SIZES[1] + 1))
        cx, cy = mid + rng.uniform(-SINGLE_JITTER, SINGLE_JITTER, size=2)
        return Scene(spec, (PlacedShape(spec.objects[0], cx, cy, s),))
    along, across = (0, 1) if spec.relation == "left" else (1, 0)
    while True:  # rejection sampling; accepts within a few tries
        sa, sb = (float(v) for v in rng.integers(PAIR_SIZES[0], PAIR_SIZES[1] + 1, size=2))
        ca, cb = np.empty(2), np.empty(2)
        ca[along], cb[along] = np.array(PAIR_ANCHORS) + rng.uniform(-PAIR_JITTER, PAIR_JITTER, size=2)
        ca[across], cb[across] = mid + rng.uniform(-ACROSS_JITTER, ACROSS_JITTER, size=2)
        gap = cb[along] - ca[along]
        if gap >= (sa + sb) / 2 + 2 and abs(cb[across] - ca[across]) <= 0.5 * gap:
            return Scene(spec, (PlacedShape(spec.objects[0], *ca, sa), PlacedShape(spec.objects[1], *cb, sb)))


def sample_scenes(n: int, rng: np.random.Generator, prompts: list[str] | None = None) -> list[Scene]:
    """``n`` random scenes: of random prompts, or of ``prompts`` (cycled) when given."""
    specs = [parse_prompt(prompts[i % len(prompts)]) if prompts else sample_prompt_spec(rng) for i in range(n)]
    return [place(s, rng) for s in specs]


def _shape_mask(kind: str, x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                s: torch.Tensor) -> torch.Tensor:
    """Boolean masks ``(N, S, S)`` of N shapes of one kind (centre and size as ``(N, 1, 1)`` tensors)."""
    h = s / 2
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if kind == "bar":  # horizontal, s wide and s/2 tall
        return ((x - cx).abs() <= h) & ((y - cy).abs() <= h / 2)
    top = cy - h  # isosceles triangle, apex up
    return (y >= top) & (y <= cy + h) & ((x - cx).abs() <= (y - top) / s * h)


def render(scenes: list[Scene], supersample: int = 4) -> torch.Tensor:
    """Render scenes to float images ``(N, 3, 32, 32)`` in [0, 1] (anti-aliased by supersampling)."""
    size = IMAGE_SIZE * supersample
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.zeros(len(scenes), 3, size, size)
    palette = torch.tensor(list(COLORS.values()))
    color_index = {c: i for i, c in enumerate(COLORS)}
    # Later objects are drawn over earlier ones; objects of one slot and kind are drawn in one batched op.
    for slot in range(max((len(sc.shapes) for sc in scenes), default=0)):
        for kind in KINDS:
            rows = [i for i, sc in enumerate(scenes) if len(sc.shapes) > slot and sc.shapes[slot].spec.kind == kind]
            if not rows:
                continue
            shapes = [scenes[i].shapes[slot] for i in rows]

            def column(values: list[float]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)

            masks = _shape_mask(kind, x, y, column([p.cx for p in shapes]), column([p.cy for p in shapes]),
                                column([p.size for p in shapes]))
            colors = palette[[color_index[p.spec.color] for p in shapes]].view(-1, 3, 1, 1)
            out[rows] = torch.where(masks.unsqueeze(1), colors, out[rows])
    return torch.nn.functional.avg_pool2d(out, supersample)


def render_prompts(prompts: list[str], seed: int) -> tuple[torch.Tensor, list[Scene]]:
    """Render one random scene per prompt, deterministically from ``seed``."""
    scenes = sample_scenes(len(prompts), np.random.default_rng(seed), prompts)
    return render(scenes), scenes

