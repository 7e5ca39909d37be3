"""An adapter that makes any BFL-signature Flux model a fluxguide :class:`Backbone`.

For users of Black Forest Labs' reference code (black-forest-labs/flux): its ``Flux`` module is called as
``model(img=, img_ids=, txt=, txt_ids=, timesteps=, y=, guidance=)`` with batched ids ``(B, L, 3)``, its
``HFEmbedder`` pair gives ``txt`` (T5) and ``vec`` (CLIP), and its ``AutoEncoder.decode`` maps spatial
latents ``(B, 16, H/8, W/8)`` (scale and shift included) to images in [-1, 1]. With them::

    backbone = BFLBackbone(
        model,
        encode_fn=lambda prompts: (t5(prompts), clip(prompts)),
        decode_fn=ae.decode,
        height=1024, width=1024, guidance=3.5,
    )

Nothing here depends on the BFL package: any module with that signature and any pair of callables work.
:class:`BFLFlux` gives a diffusers ``FluxTransformer2DModel`` that signature (tests and benchmarks drive the
sampler with it); :func:`diffusers_flux_velocity` is the one place the BFL arguments are renamed for diffusers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fluxguide.backbones.base import Backbone, Conditioning, per_sample, prompts_to_encode
from fluxguide.sampling.packing import unpack

EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]


def diffusers_flux_velocity(
    owner: nn.Module,
    img: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """``owner.transformer``, a diffusers ``FluxTransformer2DModel``, called with the BFL ``flux`` signature's
    arguments as they are: :meth:`BFLFlux.forward`, and the call inside the Flux and shapes-world backbones.

    Both take ``t`` in [0, 1] and the raw distilled-guidance strength: diffusers multiplies both by 1000 inside
    ``forward`` (as BFL's ``timestep_embedding`` does with its ``time_factor``). Like BFL's ``Flux.forward``,
    ``guidance`` is ignored by a transformer without a guidance embedding and required by one with it.

    Raises:
        ValueError: a guidance-distilled transformer (FLUX.1-dev) called without ``guidance``.
    """
    transformer = owner.transformer
    if not transformer.config.guidance_embeds:
        guidance = None
    elif guidance is None:
        raise ValueError(
            "this Flux transformer is guidance-distilled (guidance_embeds=True, like FLUX.1-dev): pass guidance=, "
            "a (B,) tensor of guidance strengths"
        )
    return transformer(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=timesteps,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


class BFLFlux(nn.Module):
    """A diffusers ``FluxTransformer2DModel`` behind the BFL ``flux`` signature, computing in the dtype of its
    inputs: a base model for :func:`fluxguide.sampling.denoise` or :class:`BFLBackbone` without a text encoder or
    a VAE."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    forward = diffusers_flux_velocity


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _bound_module_dtype(fn: Callable[..., object]) -> torch.dtype | None:
    """The parameter dtype of the module that ``fn`` is a bound method of (``ae.decode``), or ``None``."""
    owner = getattr(fn, "__self__", None)
    return _model_dtype(owner) if isinstance(owner, nn.Module) else None


class BFLBackbone(Backbone):
    """A backbone around a BFL-signature velocity model and user-given text / image callables.

    The model computes in its own parameters' dtype (bf16 for BFL's Flux on GPU); the conditioning, the
    latents, the predictions returned by :meth:`forward` and the decoded images are float32, so sampler math
    stays float32. The model is frozen (``requires_grad_(False)``); gradients still flow to its inputs.

    Args:
        model: an ``nn.Module`` called as ``model(img=, img_ids=, txt=, txt_ids=, timesteps=, y=, guidance=)``
            with packed latents ``(B, seq, C)``, batched ids ``(B, seq, 3)`` / ``(B, L, 3)``, ``timesteps``
            ``(B,)`` in [0, 1] (1 = noise), returning the velocity ``noise - x0`` shaped like ``img``.
        encode_fn: ``prompts -> (txt (B, L, D_txt), vec (B, D_vec))``, e.g. BFL's T5 and CLIP ``HFEmbedder``.
        decode_fn: spatial latents ``(B, latent_channels, H / vae_scale_factor, W / vae_scale_factor)`` ->
            images ``(B, 3, H, W)`` in ``image_range``, differentiable (e.g. BFL's ``AutoEncoder.decode``).
        height, width: image size in pixels, multiples of ``vae_scale_factor * patch``.
        latent_channels: channels of the spatial latent (16 for Flux); packed tokens have
            ``latent_channels * patch**2`` channels.
        vae_scale_factor: pixels per latent cell (8 for Flux's autoencoder, 1 for pixel-space models).
        patch: side of the square patches packed into one token (2 for Flux).
        image_range: the value range of ``decode_fn``'s output, mapped to [0, 1].
        decode_dtype: dtype of the latents given to ``decode_fn``; ``None`` uses the parameter dtype of the
            module when ``decode_fn`` is a bound method (``ae.decode``), else float32.
        guidance: distilled guidance strength passed to the model; ``None`` for models without guidance
            embedding. If ``None`` and ``model.params.guidance_embed`` is true (BFL's FLUX.1-dev): 3.5.
        num_steps: default number of sampling steps.
        schedule_shift: use Flux's resolution-dependent schedule shift (BFL: ``False`` for FLUX.1-schnell).
    """

    def __init__(
        self,
        model: nn.Module,
        encode_fn: EncodeFn,
        decode_fn: DecodeFn,
        *,
        height: int,
        width: int,
        latent_channels: int = 16,
        vae_scale_factor: int = 8,
        patch: int = 2,
        image_range: tuple[float, float] = (-1.0, 1.0),
        decode_dtype: torch.dtype | None = None,
        guidance: float | None = None,
        num_steps: int = 28,
        schedule_shift: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module with the BFL flux signature, got {type(model).__name__}"
            )
        if not callable(encode_fn) or not callable(decode_fn):
            raise TypeError(
                "encode_fn and decode_fn must be callables (prompts -> (txt, vec); latents -> images)"
            )
        cell = vae_scale_factor * patch
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % cell:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of {cell} "
                    f"(vae_scale_factor {vae_scale_factor} x patch {patch}); "
                    f"use e.g. {max(cell, (int(value) // cell) * cell)}"
                )
        if image_range[1] <= image_range[0]:
            raise ValueError(f"image_range must be (low, high) with low < high, got {image_range}")
        self.model = model
        self.model.requires_grad_(False)
        self.encode_fn = encode_fn
        self.decode_fn = decode_fn
        self.image_height, self.image_width = height, width
        self.vae_scale_factor, self.patch = vae_scale_factor, patch
        self.latent_height, self.latent_width = height // cell, width // cell
        self.latent_seq = self.latent_height * self.latent_width
        self.spatial_channels = latent_channels
        self.latent_channels = latent_channels * patch * patch
        self.image_range = (float(image_range[0]), float(image_range[1]))
        self.decode_dtype = decode_dtype or _bound_module_dtype(decode_fn) or torch.float32
        if guidance is None and getattr(getattr(model, "params", None), "guidance_embed", False):
            guidance = 3.5
        self.default_guidance = None if guidance is None else float(guidance)
        self.default_num_steps = num_steps
        self.schedule_shift = schedule_shift

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> Conditioning:
        """Prompts -> float32 :class:`Conditioning` through ``encode_fn``, on the backbone's device."""
        prompts = prompts_to_encode(prompts)
        out = self.encode_fn(prompts)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"encode_fn must return a pair (txt, vec), got {type(out).__name__}")
        txt, vec = out
        b = len(prompts)
        if txt.ndim != 3 or txt.shape[0] != b or vec.ndim != 2 or vec.shape[0] != b:
            raise ValueError(
                f"encode_fn must return txt (B, L, D) and vec (B, D) for B={b} prompts, "
                f"got txt {tuple(txt.shape)} and vec {tuple(vec.shape)}"
            )
        device = self.device
        return Conditioning.in_flux_layout(txt, vec, prompts, (self.latent_height, self.latent_width), device)

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
        """Call the model in its dtype with batched ids; return the float32 velocity ``(B, seq, C)``."""
        self.check_packed(img)
        dtype = _model_dtype(self.model)
        b = img.shape[0]
        # BFL's Flux concatenates txt_ids and img_ids along dim 1, so it needs them batched.
        img_ids = img_ids.expand(b, -1, -1) if img_ids.ndim == 2 else img_ids
        txt_ids = txt_ids.expand(b, -1, -1) if txt_ids.ndim == 2 else txt_ids
        pred = self.model(
            img=img.to(dtype),
            img_ids=img_ids.to(dtype),
            txt=txt.to(dtype),
            txt_ids=txt_ids.to(dtype),
            timesteps=per_sample(timesteps, b, dtype),
            y=y.to(dtype),
            guidance=per_sample(guidance, b, dtype),
        )
        if not isinstance(pred, torch.Tensor) or pred.shape != img.shape:
            got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise ValueError(
                f"the model returned {got}, expected the velocity shaped like img {tuple(img.shape)}"
            )
        return pred.float()

    def decode(self, img: torch.Tensor) -> torch.Tensor:
        """Packed latents -> float32 images ``(B, 3, H, W)`` in [0, 1] via ``decode_fn``, differentiable."""
        self.check_latents(img, "decode")
        z = unpack(img, self.latent_height * self.patch, self.latent_width * self.patch, patch=self.patch)
        x = self.decode_fn(z.to(self.decode_dtype))
        expected = (img.shape[0], 3, self.image_height, self.image_width)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"decode_fn returned {got}, expected images of shape {expected}")
        low, high = self.image_range
        return ((x.float() - low) / (high - low)).clamp(0, 1)

    def extra_repr(self) -> str:
        size = f"{self.image_height}x{self.image_width}"
        return f"image={size}, latent={self.latent_shape}, guidance={self.default_guidance}"


__all__ = ["BFLBackbone", "BFLFlux", "diffusers_flux_velocity"]
