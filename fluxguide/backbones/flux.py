"""Flux (FLUX.1-dev / -schnell) through diffusers, as a fluxguide :class:`Backbone`.

The backbone bundles diffusers' ``FluxTransformer2DModel``, the CLIP text model (pooled ``vec``), the T5
encoder (token features ``txt``), their tokenizers and the ``AutoencoderKL``, and exposes the transformer
with the BFL ``flux`` model signature so :func:`fluxguide.sampling.denoise` drives it unchanged.

Time and guidance conventions (checked against diffusers' ``FluxPipeline.__call__``): the pipeline passes
``timestep = sigma`` (its ``t / 1000``) and the raw distilled guidance strength (e.g. 3.5) to the
transformer, which multiplies both by 1000 before the sinusoidal embedding, exactly as BFL's ``Flux``
does inside ``timestep_embedding``. ``sigma`` is fluxguide's ``t`` (1 = noise) and the transformer's output
is the velocity ``noise - x0`` that ``FlowMatchEulerDiscreteScheduler.step`` integrates with
``x + (sigma_next - sigma) * v`` -- the same Euler step as :func:`fluxguide.sampling.euler_step`. So both
are passed through unchanged; the tests compare against ``FluxPipeline`` to keep it that way.

Text encoding, packing and VAE decoding follow ``FluxPipeline`` (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``_unpack_latents``, and ``latents / scaling_factor + shift_factor`` before
``vae.decode``) in huggingface/diffusers v0.42.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5EncoderModel,
    T5TokenizerFast,
)

from fluxguide.backbones.base import (
    Backbone,
    Conditioning,
    check_num_steps,
    per_sample,
    prompts_to_encode,
)
from fluxguide.backbones.bfl import diffusers_flux_velocity
from fluxguide.backbones.flux_source import resolve_pipeline_source
from fluxguide.backbones.weights import check_finite_weights
from fluxguide.sampling.packing import pack, unpack
from fluxguide.sampling.schedule import get_lin_function, time_shift

#: Flux-dev's ``scheduler_config.json`` entries that define the sampling schedule.
DEFAULT_SCHEDULE_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# Scheduler options that change the sigmas in ways fluxguide's Euler schedule does not reproduce.
_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def _check_divisible(name: str, value: int, multiple: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % multiple:
        lower = max(multiple, (int(value) // multiple) * multiple) if isinstance(value, int) else multiple
        raise ValueError(
            f"{name}={value!r} must be a positive multiple of {multiple}: Flux packs the VAE's latent grid "
            f"(1/{multiple // 2} of the image) into 2x2 patches. Use e.g. {name}={lower} "
            f"or {lower + multiple}."
        )


class FluxBackbone(Backbone):
    """FLUX.1 from diffusers components, with the BFL model signature and fluxguide's conventions.

    Model compute runs in the components' dtype (bf16 on GPU); the conditioning, the latents, the
    predictions returned by :meth:`forward` and the decoded images are float32, so sampler math stays
    float32 (docs/design.md, "Precision"). All parameters are frozen; gradients still flow to the inputs, so
    rewards can be backpropagated through :meth:`forward` and :meth:`decode`.

    Args:
        transformer: the ``FluxTransformer2DModel``.
        vae: the ``AutoencoderKL`` whose latents the transformer denoises.
        text_encoder: the CLIP text model; its ``pooler_output`` is ``vec``.
        tokenizer: CLIP's tokenizer (padded to its ``model_max_length``, 77 for Flux).
        text_encoder_2: the T5 encoder; its last hidden state is ``txt``.
        tokenizer_2: T5's tokenizer.
        height, width: image size in pixels, multiples of ``2 * vae_scale_factor`` (16 for Flux).
        max_sequence_length: T5 tokens per prompt (512 for FLUX.1-dev, 256 for FLUX.1-schnell).
        guidance: distilled guidance strength used when the transformer has ``guidance_embeds``
            (FLUX.1-dev); ignored otherwise.
        num_steps: default number of sampling steps.
        scheduler_config: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config (``shift``,
            ``use_dynamic_shifting``, ``base_shift``, ``max_shift``, ``base_image_seq_len``,
            ``max_image_seq_len``); defaults to FLUX.1-dev's.
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: PreTrainedTokenizerBase,
        *,
        height: int = 1024,
        width: int = 1024,
        max_sequence_length: int = 512,
        guidance: float = 3.5,
        num_steps: int = 28,
        scheduler_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Registration order matters: Backbone.dtype / .device read the first parameter (the transformer's).
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.requires_grad_(False)
        self.eval()

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        _check_divisible("height", height, 2 * self.vae_scale_factor)
        _check_divisible("width", width, 2 * self.vae_scale_factor)
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in [1, 512] (T5's Flux limit), got {max_sequence_length}"
            )
        self._check_component_shapes()

        self.image_height, self.image_width = height, width
        self.latent_height = height // (2 * self.vae_scale_factor)
        self.latent_width = width // (2 * self.vae_scale_factor)
        self.latent_seq = self.latent_height * self.latent_width
        self.latent_channels = 4 * vae.config.latent_channels
        self.max_sequence_length = max_sequence_length
        self.clip_max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.default_guidance = float(guidance) if self.guidance_embeds else None
        self.default_num_steps = num_steps
        self.default_cfg_scale = 1.0

        config = dict(DEFAULT_SCHEDULE_CONFIG)
        if scheduler_config is not None:
            for option in _UNSUPPORTED_SCHEDULER_OPTIONS:
                if scheduler_config.get(option):
                    raise ValueError(
                        f"scheduler option {option}={scheduler_config[option]!r} is not supported by "
                        "fluxguide's Flux Euler schedule; remove it from scheduler_config"
                    )
            if scheduler_config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(
                    f"scheduler time_shift_type={scheduler_config['time_shift_type']!r} is not supported; "
                    "Flux uses 'exponential'"
                )
            config.update({k: scheduler_config[k] for k in DEFAULT_SCHEDULE_CONFIG if k in scheduler_config})
        self.schedule_config = config
        self.schedule_shift = bool(config["use_dynamic_shifting"]) or float(config["shift"]) != 1.0

    def _check_component_shapes(self) -> None:
        """Raise if the components were not made for each other (names the mismatching sizes)."""
        tcfg = self.transformer.config
        latent_channels = self.vae.config.latent_channels
        if tcfg.in_channels != 4 * latent_channels:
            raise ValueError(
                f"transformer in_channels={tcfg.in_channels} but the VAE has {latent_channels} latent "
                f"channels (2x2 patches need in_channels = {4 * latent_channels}); use the VAE of the same "
                "Flux checkpoint"
            )
        if tcfg.joint_attention_dim != self.text_encoder_2.config.d_model:
            raise ValueError(
                f"transformer joint_attention_dim={tcfg.joint_attention_dim} but the T5 encoder has "
                f"d_model={self.text_encoder_2.config.d_model}; use the text_encoder_2 of the same checkpoint"
            )
        if tcfg.pooled_projection_dim != self.text_encoder.config.hidden_size:
            raise ValueError(
                f"transformer pooled_projection_dim={tcfg.pooled_projection_dim} but the CLIP text model has "
                f"hidden_size={self.text_encoder.config.hidden_size}; use the text_encoder of the same "
                "checkpoint"
            )

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        *,
        height: int = 1024,
        width: int = 1024,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_sequence_length: int = 512,
        guidance: float = 3.5,
        num_steps: int = 28,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
    ) -> FluxBackbone:
        """Load Flux from a diffusers FluxPipeline folder or a hub id (e.g. ``black-forest-labs/FLUX.1-dev``).

        Args:
            path_or_hub_id: a local folder with ``transformer/``, ``text_encoder/``, ``text_encoder_2/``,
                ``tokenizer/``, ``tokenizer_2/``, ``vae/`` (and optionally ``scheduler/``), as written by
                ``FluxPipeline.save_pretrained``; or a hub id (downloaded by diffusers/transformers into the
                Hugging Face cache where the machine has access).
            height, width: image size, multiples of 16.
            device: where the models live.
            dtype: model compute dtype; ``None`` picks bfloat16 on CUDA and float32 elsewhere.
            max_sequence_length, guidance, num_steps: see :class:`FluxBackbone`.
            revision, variant, local_files_only: passed to the components' ``from_pretrained``.
        """
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        common: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
        source, scheduler_config = resolve_pipeline_source(path_or_hub_id, common)

        model_kwargs = dict(common, torch_dtype=dtype)
        if variant is not None:
            model_kwargs["variant"] = variant

        def load(model_cls: Any, subfolder: str) -> Any:
            # Non-finite weights are named here, once, instead of surfacing later as a NaN prediction
            # blamed on the guidance model or the learning rate.
            module = model_cls.from_pretrained(source, subfolder=subfolder, **model_kwargs)
            check_finite_weights(
                module, f"{source}/{subfolder}",
                f"re-download or re-save the {subfolder} weights (FluxPipeline.save_pretrained)",
            )
            return module

        backbone = cls(
            transformer=load(FluxTransformer2DModel, "transformer"),
            vae=load(AutoencoderKL, "vae"),
            text_encoder=load(CLIPTextModel, "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            text_encoder_2=load(T5EncoderModel, "text_encoder_2"),
            tokenizer_2=T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", **common),
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            guidance=guidance,
            num_steps=num_steps,
            scheduler_config=scheduler_config,
        )
        return backbone.to(device=device, dtype=dtype)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> FluxBackbone:
        """Wrap the components of an already loaded diffusers ``FluxPipeline`` (shared, not copied).

        ``kwargs`` go to :class:`FluxBackbone` (``height``, ``width``, ``max_sequence_length``, ...).

        Raises:
            ValueError: a component's weights hold NaN/inf (named: ``pipe.transformer``, ``pipe.vae``, ...).
        """
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            component = getattr(pipe, name, None)
            if isinstance(component, nn.Module):
                check_finite_weights(component, f"pipe.{name}", f"reload the pipeline's {name} from intact weights")
        return cls(
            transformer=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            scheduler_config=kwargs.pop("scheduler_config", pipe.scheduler.config),
            **kwargs,
        )

    # -------------------------------------------------------------------------------------- text side
    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> Conditioning:
        """Prompts -> float32 :class:`Conditioning`: T5 tokens ``(B, L, d_model)``, CLIP pooled ``(B, D)``."""
        prompts = prompts_to_encode(prompts)
        device = self.device
        clip_ids = _token_ids(self.tokenizer, prompts, self.clip_max_length)
        vec = self.text_encoder(
            clip_ids.to(self.text_encoder.device), output_hidden_states=False
        ).pooler_output
        t5_ids = _token_ids(self.tokenizer_2, prompts, self.max_sequence_length)
        txt = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return Conditioning.in_flux_layout(txt, vec, prompts, (self.latent_height, self.latent_width), device)

    # ------------------------------------------------------------------------------------------ model
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
        """The velocity ``noise - x0`` at ``timesteps`` in [0, 1] (1 = noise), float32 ``(B, seq, C)``.

        Ids may be ``(L, 3)`` or batched ``(B, L, 3)`` as BFL's ``prepare`` makes them (the first row is
        used: Flux's ids are the same for every sample). ``guidance`` is the raw distilled guidance strength
        per sample (e.g. 3.5); it is ignored by transformers without a guidance embedding, as in BFL's Flux.
        """
        self.check_packed(img)
        dtype = self.transformer.dtype
        batch = img.shape[0]
        pred = diffusers_flux_velocity(
            self, img.to(dtype), img_ids[0] if img_ids.ndim == 3 else img_ids, txt.to(dtype),
            txt_ids[0] if txt_ids.ndim == 3 else txt_ids, per_sample(timesteps, batch, dtype), y.to(dtype),
            per_sample(guidance, batch, dtype),
        )
        return pred.float()

    def schedule(self, num_steps: int | None = None) -> list[float]:
        """The ``num_steps + 1`` times of the pipeline's scheduler for this resolution (1 -> 0).

        With ``use_dynamic_shifting`` this is :func:`fluxguide.sampling.get_schedule` (Flux's resolution
        dependent shift ``mu``, a line through ``(base_image_seq_len, base_shift)`` and
        ``(max_image_seq_len, max_shift)``); otherwise the static shift ``s t / (1 + (s - 1) t)``, which is
        ``time_shift`` with ``mu = log s`` (``s = 1`` is FLUX.1-schnell's plain linspace).
        """
        check_num_steps(num_steps)
        num_steps = self.default_num_steps if num_steps is None else num_steps
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        cfg = self.schedule_config
        t = torch.linspace(1, 0, num_steps + 1)
        if cfg["use_dynamic_shifting"]:
            line = get_lin_function(
                x1=cfg["base_image_seq_len"],
                y1=cfg["base_shift"],
                x2=cfg["max_image_seq_len"],
                y2=cfg["max_shift"],
            )
            t = time_shift(line(self.latent_seq), 1.0, t)
        elif float(cfg["shift"]) != 1.0:
            t = time_shift(math.log(float(cfg["shift"])), 1.0, t)
        return t.tolist()

    # ------------------------------------------------------------------------------------- image side
    def decode(self, img: torch.Tensor) -> torch.Tensor:
        """Packed latents ``(B, seq, C)`` -> float32 images ``(B, 3, H, W)`` in [0, 1], differentiable."""
        self.check_latents(img, "decode")
        z = unpack(img, 2 * self.latent_height, 2 * self.latent_width)
        shift = self.vae.config.shift_factor or 0.0
        z = z / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> packed float32 latents ``(B, seq, C)`` (VAE posterior mode).

        The inverse of :meth:`decode` up to the VAE's reconstruction error: a reference image's ``x0`` for
        behaviour-cloning targets or image-to-image starts.
        """
        expected = (3, self.image_height, self.image_width)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"encode_images needs images (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        x = (images * 2 - 1).to(device=self.device, dtype=self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode().float()
        shift = self.vae.config.shift_factor or 0.0
        return pack((z - shift) * self.vae.config.scaling_factor)

    def extra_repr(self) -> str:
        return (
            f"image={self.image_height}x{self.image_width}, latent={self.latent_shape}, "
            f"max_sequence_length={self.max_sequence_length}, guidance={self.default_guidance}"
        )



def _token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> torch.Tensor:
    """``(B, max_length)`` token ids, padded and truncated to ``max_length`` as Flux's pipeline does."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


__all__ = ["DEFAULT_SCHEDULE_CONFIG", "FluxBackbone"]
