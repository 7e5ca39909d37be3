"""The backbone contract: what a sampler needs from a base model (docs/design.md, "backbones").

A backbone is an ``nn.Module`` whose ``forward`` has the BFL ``flux`` model signature, so it can be passed
straight to :func:`fluxguide.sampling.denoise`, plus ``encode`` (prompts -> conditioning), ``decode``
(latents -> images in [0, 1], differentiable), ``noise`` and its latent shape.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from fluxguide.backbones.prompt_check import check_backbone_prompts
from fluxguide.errors import UserError
from fluxguide.rewards.registry import make_reward, reward_options, reward_world
from fluxguide.sampling.cfg import ClassifierFreeGuidance
from fluxguide.sampling.conditioning import Conditioning, model_velocity
from fluxguide.sampling.denoise import GuidanceFn, GuidanceScale, check_guidance_scale, denoise
from fluxguide.sampling.schedule import get_schedule


class VerificationResult(Protocol):
    """What a world's verifier returns: per-image pass/fail, per-attribute scores and the pass rate."""

    passed: torch.Tensor
    scores: dict[str, torch.Tensor]

    @property
    def accuracy(self) -> float: ...


PROMPT_PREVIEW_CHARS = 60


def prompt_preview(prompt: object, limit: int = PROMPT_PREVIEW_CHARS) -> str:
    """``repr`` of a prompt for error messages: at most ``limit`` characters, with the length when cut."""
    if not isinstance(prompt, str):
        return f"{type(prompt).__name__} {prompt!r}"[: limit + 20]
    if len(prompt) <= limit:
        return repr(prompt)
    return f"{prompt[:limit]!r}... ({len(prompt)} characters)"


def check_prompt_list(prompts: object, *, method: str = "sample") -> list[str]:
    """``prompts`` as a list after checking it is a non-empty list (or tuple) of strings, not a bare string.

    Raises:
        TypeError: a single string (``sample("a red circle")`` would otherwise sample one image per
            character), a non-sequence, or non-string items.
        ValueError: no prompts.
    """
    if isinstance(prompts, str):
        raise TypeError(
            f"{method} takes a list of prompts, got the string {prompt_preview(prompts)}: wrap it in a list "
            f"([prompt])"
        )
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise TypeError(f"{method} takes a list of prompt strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{method} needs at least one prompt, got an empty list: pass a list of prompt strings")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{method} takes prompt strings; items (index, type) {bad[:5]} are not strings")
    return prompts


def prompts_to_encode(prompts: list[str] | str) -> list[str]:
    """What an encoder takes: a bare string as a list of one, else a non-empty list of strings.

    Raises:
        ValueError: no prompts, or an item that is not a string.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode needs a non-empty list of prompt strings, got {prompts!r}")
    return prompts


def per_sample(value: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A model input given per sample (times, guidance strengths) as a ``(batch,)`` tensor in ``dtype``: a 0-d
    tensor is broadcast; ``None`` (no guidance) stays ``None``."""
    if value is None:
        return None
    return (value.expand(batch) if value.ndim == 0 else value).to(dtype)


def check_num_steps(num_steps: object, *, name: str = "num_steps") -> None:
    """Raise unless ``num_steps`` is ``None`` (the default) or an integer >= 1 (0 is refused, not replaced)."""
    if num_steps is None:
        return
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer or None (the default), got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(
            f"{name} must be a positive integer (>= 1 sampling step), got {num_steps}; pass None for the "
            "backbone's default"
        )


class RewardWorldError(UserError, ValueError):
    """A reward of one world asked to score the images of another backbone (the shapes verifier on Flux)."""


class Backbone(nn.Module, ABC):
    """Base class of base models. Subclasses set the attributes below and implement the abstract methods.

    Attributes:
        latent_seq, latent_channels: packed latent shape ``(seq, C)``.
        image_height, image_width: decoded image size.
        default_num_steps: the sampler's default number of steps.
        default_guidance: distilled guidance strength passed to the model (``None`` if it has none).
        default_cfg_scale: the classifier-free guidance scale :meth:`sample` uses by default (1 = no CFG).
        recommended_cfg_scale: the CFG scale that works well, the reference a guidance policy is compared with
            and the teacher of CFG distillation (default: ``default_cfg_scale``; the shapes world: 3).
        schedule_shift: whether :meth:`schedule` uses Flux's resolution-dependent shift.
        pixel_patch: side of the spatial patch packed into one token (2 latents in Flux); guidance networks
            that unpack tokens to a grid and coarse actions read it.
        max_prompt_chars: the longest prompt (in characters) :meth:`check_prompts` accepts (``None``: no limit);
            a tokenizer truncates far shorter, so a longer prompt is a mistake, not a request.
        verifier: an optional exact judge ``verifier(images, prompts) -> VerificationResult`` of the world
            (``None`` for open-world backbones such as Flux). Evaluation reports its pass rate when present:
            the held-out metric that tells real improvement from reward hacking.
        world_name: the world this backbone renders (``None``: the open world, e.g. Flux). It scores the rewards
            that declare this world (``fluxguide.rewards.world_reward``) and refuses those of another world.

    World-specific behaviour reaches the layers above only through these attributes and the hooks
    :meth:`default_reward`, :meth:`reward_kwargs`, :meth:`build_reward`, :meth:`check_prompts`,
    :meth:`straight_through_decoder` and :meth:`render_references`, never through ``isinstance`` checks or
    backbone names.
    """

    latent_seq: int
    latent_channels: int
    image_height: int
    image_width: int
    default_num_steps: int = 28
    default_guidance: float | None = None
    default_cfg_scale: float = 1.0
    recommended_cfg_scale: float | None = None
    schedule_shift: bool = True
    pixel_patch: int = 2
    max_prompt_chars: int | None = 4096
    verifier: ClassVar[Callable[[torch.Tensor, list[str]], VerificationResult] | None] = None
    world_name: ClassVar[str | None] = None

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_seq, self.latent_channels)

    def check_latents(self, img: torch.Tensor, method: str) -> None:
        """Raise unless ``img`` is packed latents ``(B, seq, C)`` of this backbone's shape (``method`` names the
        caller in the message)."""
        if img.ndim != 3 or tuple(img.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"{method} needs packed latents (B, {self.latent_seq}, {self.latent_channels}) for "
                f"{self.image_height}x{self.image_width} images, got {tuple(img.shape)}"
            )

    def check_packed(self, img: torch.Tensor) -> None:
        """Raise unless ``img`` is packed latents ``(B, seq, latent_channels)``."""
        if img.ndim != 3 or img.shape[-1] != self.latent_channels:
            raise ValueError(
                f"img must be packed latents (B, seq, {self.latent_channels}), got shape {tuple(img.shape)}"
            )

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts into :class:`Conditioning` on the backbone's device."""

    @abstractmethod
    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base model's velocity, BFL signature; ``timesteps`` in [0, 1] with 1 = noise."""

    @abstractmethod
    def decode(self, img: torch.Tensor) -> torch.Tensor:
        """Packed latents ``(B, seq, C)`` -> images ``(B, 3, H, W)`` in [0, 1], differentiable."""

    def velocity(
        self, img: torch.Tensor, t: torch.Tensor | float, cond: Conditioning, guidance: float | None = None
    ) -> torch.Tensor:
        """The base prediction at time ``t`` (a float or a ``(B,)`` tensor) under conditioning ``cond``, with this
        backbone's distilled guidance unless ``guidance`` says otherwise (:func:`~fluxguide.sampling.model_velocity`)."""
        return model_velocity(self, img, t, cond, self.default_guidance if guidance is None else guidance)

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal initial latents ``(batch, seq, C)`` in float32 (sampler math stays float32 even
        when the model runs in bf16), drawn from ``generator`` on its device and moved to the backbone's."""
        device = generator.device if generator is not None else self.device
        x = torch.randn((batch, self.latent_seq, self.latent_channels), generator=generator, device=device)
        return x.to(device=self.device)

    def schedule(self, num_steps: int | None = None) -> list[float]:
        """Flux's schedule for this backbone's sequence length (``None``: ``default_num_steps``; 0 and negative
        counts are refused)."""
        check_num_steps(num_steps)
        return get_schedule(
            self.default_num_steps if num_steps is None else int(num_steps), self.latent_seq, shift=self.schedule_shift
        )

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise unless this backbone can encode every prompt: a non-empty list of non-empty strings of at most
        :attr:`max_prompt_chars` characters. Worlds with a grammar refuse prompts outside it (the shapes world).
        Called through :func:`~fluxguide.backbones.prompt_check.check_backbone_prompts` when an env is built, when
        a script starts and before sampling, so a bad prompt fails before any compute is spent; messages show at
        most the first 60 characters of a prompt and its length.

        Raises:
            TypeError: a bare string, or non-string items.
            ValueError: no prompts, an empty prompt, or one longer than :attr:`max_prompt_chars`.
        """
        prompts = check_prompt_list(prompts, method=f"{type(self).__name__}.check_prompts")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise ValueError(
                f"prompt {empty[0]} is empty ({prompts[empty[0]]!r}); every prompt must be a non-empty string"
            )
        limit = self.max_prompt_chars
        if limit is not None:
            long = [(i, p) for i, p in enumerate(prompts) if len(p) > limit]
            if long:
                i, p = long[0]
                raise ValueError(
                    f"prompt {i} is {len(p)} characters long, more than {type(self).__name__} encodes "
                    f"({limit} characters): {prompt_preview(p)}; shorten it"
                    + (f" ({len(long)} prompts are too long)" if len(long) > 1 else "")
                )

    @property
    def image_channels(self) -> int:
        """Image (or latent) channels per token: ``latent_channels / pixel_patch**2`` (16 in Flux)."""
        return self.latent_channels // self.pixel_patch**2

    def default_reward(self) -> str:
        """The reward this backbone is trained against when none is named: ``"clip"`` (an open_clip CLIP score,
        whose weights the caller names) for open-world backbones; a world names one of its own."""
        return "clip"

    def monitor_rewards(self) -> tuple[str, ...]:
        """The rewards a training run scores its held-out images with besides the trained one, to show reward
        hacking (:mod:`fluxguide.harness.monitoring`; ``--monitor-rewards`` replaces them). None for open-world
        backbones: each is a model to load, named by the user (e.g. ``--monitor-rewards clip aesthetic`` with their
        weights); a world names its own."""
        return ()

    def reward_kwargs(self, name: str) -> dict[str, Any]:
        """What this backbone gives the reward ``name``, among the options its factory declares by name (read from
        its signature, not from a list of reward names): ``device`` (this backbone's, so open_clip rewards load
        next to it), ``verify`` (this backbone's :attr:`verifier`, if it has one) and, for the rewards of this
        backbone's own world (:attr:`world_name`), ``world`` (the backbone itself: the shapes rewards share its
        loaded tiny CLIP)."""
        offered: dict[str, Any] = {"device": self.device}
        if self.verifier is not None:
            offered["verify"] = self.verifier
        if self.world_name is not None and reward_world(name) == self.world_name:
            offered["world"] = self
        options = reward_options(name)
        return {key: value for key, value in offered.items() if key in options}

    def build_reward(self, name: str | None = None, *, seed: int = 0, **kwargs: Any) -> nn.Module:
        """The reward ``name`` (default :meth:`default_reward`) for this backbone's images: ``make_reward(name)``
        with :meth:`reward_kwargs` and ``seed`` (for a random reward whose factory takes it) unless ``kwargs``
        set them.

        Raises:
            RewardWorldError: the reward declares another world (``fluxguide.rewards.world_reward``) than this
                backbone's :attr:`world_name`.
            fluxguide.plugins.PluginError: an unknown name, or options its factory does not take.
        """
        name = self.default_reward() if name is None else name
        world = reward_world(name)
        if world is not None and world != self.world_name:
            default = self.default_reward()
            raise RewardWorldError(
                f"reward {name!r} belongs to the {world} world and cannot score {type(self).__name__} images; use "
                f"a reward for them, e.g. {default!r} (scripts: --reward {default}; an open_clip reward takes its "
                "weights in --reward-kwargs, e.g. '{\"model_name\": \"ViT-L-14\", \"pretrained\": "
                "\"/weights/vitl14.safetensors\"}')"
            )
        seeded = {"seed": seed} if "seed" in reward_options(name) else {}
        return make_reward(name, **{**self.reward_kwargs(name), **seeded, **kwargs})

    def straight_through_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`decode` with a straight-through final clamp, for worlds whose decoder is a clamp.

        Raises:
            NotImplementedError: this backbone's decoder is not a clamp.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no straight-through decoder (its decoder is not a clamp); "
            "drop --straight-through"
        )

    def render_references(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Reference images ``(B, 3, H, W)`` in [0, 1] that show what each prompt says, for worlds that can render
        one (the targets of reference-image behaviour cloning); random choices come from ``generator``.

        Raises:
            NotImplementedError: this backbone cannot render references (pass your own reference images).
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot render reference images for prompts; give ReferenceImage a function "
            "that returns your own references"
        )

    def with_cfg(self, scale: float) -> ClassifierFreeGuidance:
        """This backbone wrapped in classifier-free guidance against the empty prompt."""
        uncond = self.encode([""])
        return ClassifierFreeGuidance(self, uncond.txt, uncond.vec, scale)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        guidance_model: GuidanceFn | None = None,
        guidance_scale: GuidanceScale = 1.0,
        cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """Prompts -> images ``(B, 3, H, W)`` in [0, 1] with the (optionally guided) Euler sampler.

        Raises:
            TypeError: ``prompts`` is a bare string (wrap it in a list) or holds non-strings.
            ValueError: no prompts, a bad ``num_steps`` or ``noise`` of the wrong batch size; a prompt this backbone
                cannot encode (:meth:`check_prompts`) is a ``PromptError``, a ``ValueError`` too.
        """
        prompts = check_prompt_list(prompts, method="sample")
        check_backbone_prompts(self, prompts)
        timesteps = self.schedule(num_steps)
        check_guidance_scale(guidance_scale, len(timesteps) - 1)
        if noise is not None and (noise.ndim != 3 or noise.shape[0] != len(prompts)):
            raise ValueError(
                f"noise must be packed latents ({len(prompts)}, {self.latent_seq}, {self.latent_channels}), one "
                f"per prompt, got shape {tuple(noise.shape)}"
            )
        cond = self.encode(prompts)
        img = noise if noise is not None else self.noise(len(prompts), generator)
        cfg_scale = self.default_cfg_scale if cfg_scale is None else cfg_scale
        model = self if cfg_scale == 1.0 else self.with_cfg(cfg_scale)
        latents = denoise(
            model, img, cond.img_ids, cond.txt, cond.txt_ids, cond.vec, timesteps,
            guidance=self.default_guidance, guidance_model=guidance_model, guidance_scale=guidance_scale,
        )
        return self.decode(latents)


@torch.no_grad()
def sample_prompts(
    backbone: Backbone,
    prompts: list[str],
    samples_per_prompt: int = 4,
    seed: int = 0,
    cfg_scale: float = 1.0,
    guidance_model: GuidanceFn | None = None,
    guidance_scale: GuidanceScale = 1.0,
    num_steps: int | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, list[str]]:
    """Images ``(len(prompts) * samples_per_prompt, 3, H, W)`` and their prompts, with seeded noise.

    The noise depends only on ``seed`` and the sample index, so two samplers evaluated with one seed see the
    same initial noise (paired comparisons).

    Raises:
        TypeError, ValueError: a bare string or bad prompts (:meth:`Backbone.check_prompts`), or counts below 1.
    """
    prompts = check_prompt_list(prompts, method="sample_prompts")
    check_backbone_prompts(backbone, prompts)
    for name, value in (("samples_per_prompt", samples_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_num_steps(num_steps)
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(all_prompts), backbone.latent_seq, backbone.latent_channels), generator=generator)
    images = []
    for start in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[start : start + batch_size]
        images.append(backbone.sample(
            chunk, num_steps=num_steps, noise=noise[start : start + len(chunk)].to(backbone.device, backbone.dtype),
            cfg_scale=cfg_scale, guidance_model=guidance_model, guidance_scale=guidance_scale,
        ).float().cpu())
    return torch.cat(images), all_prompts


def straight_through_clamp(images: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Clamp to ``[low, high]`` in the forward pass, identity in the backward pass (straight-through).

    A plain clamp gives zero gradient to every pixel outside the range, e.g. the black background a decoder
    clamps to 0: the reward can then never ask for a shape to grow into it. The straight-through estimator
    (Bengio et al. 2013) keeps the clamped values but lets the gradient through.
    """
    clamped = images.clamp(low, high)
    return images + (clamped - images).detach()
