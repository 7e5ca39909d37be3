"""Tiny random Flux pipelines built in code, for tests and examples that must run offline in seconds.

Every part is a real diffusers / transformers object (``FluxTransformer2DModel``, ``CLIPTextModel``,
``T5EncoderModel``, ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``) with a few thousand parameters,
and the two tokenizers are real tokenizers whose vocabularies are trained in code on a handful of sentences:
a byte-level BPE for CLIP (``tokenizers``' BPE trainer, CLIP's pre-tokenisation) and a unigram
SentencePiece model for T5. Nothing is downloaded. The shapes follow the structure of FLUX.1-dev
(two text encoders, an 8x VAE, 2x2 patches, guidance embedding), not its sizes.

The tiny configurations follow the spirit of diffusers' own pipeline tests
(huggingface/diffusers ``tests/pipelines/flux/test_pipeline_flux.py``, ``get_dummy_components``).
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fluxguide.backbones.flux import FluxBackbone

#: Sentences the tiny tokenizers are trained on: enough to tokenise typical prompts into several pieces.
TINY_CORPUS: tuple[str, ...] = (
    "a red circle on the left of a blue square",
    "a green triangle above a yellow star",
    "two small purple squares at the bottom right",
    "a large orange circle in the center",
    "a photo of a cat sitting on a chair",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a mountain lake at sunset",
    "a portrait of a woman with long hair, studio lighting",
    "a bowl of fruit on a wooden table",
    "a city street at night in the rain",
    "the quick brown fox jumps over the lazy dog",
    "high quality, detailed, sharp focus, 4k",
    # Every upper-case letter, digit and common punctuation mark, so that no character is unknown to T5.
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 . , ! ? ; : ' \" ( ) - / & % +",
)

#: Flux-dev's scheduler configuration (``scheduler/scheduler_config.json`` of black-forest-labs/FLUX.1-dev).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# CLIP's pre-tokenisation split (the regex of CLIP's tokenizer: special tokens, contractions, letters,
# single digits, runs of other symbols), followed by GPT-2's byte-to-unicode mapping.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable unicode character table (the 256 base symbols of CLIP's BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(
    corpus: tuple[str, ...] = TINY_CORPUS, num_merges: int = 300, model_max_length: int = 77
) -> CLIPTokenizer:
    """A working CLIP byte-level BPE tokenizer whose merges are learned from ``corpus`` in code.

    The vocabulary is laid out like CLIP's: the 256 byte symbols, the same with the end-of-word suffix
    ``</w>`` (so any text tokenises without unknown tokens), the learned merges, then
    ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = _byte_alphabet()
    bpe = Tokenizer(models.BPE(unk_token=_CLIP_EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + num_merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    raw_merges = json.loads(bpe.to_str())["model"]["merges"][:num_merges]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]

    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [_CLIP_BOS, _CLIP_EOS]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8"
        )
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (Path(folder) / "merges.txt").write_text(merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def tiny_t5_tokenizer(corpus: tuple[str, ...] = TINY_CORPUS, vocab_size: int = 200) -> T5TokenizerFast:
    """A working T5 tokenizer from a unigram SentencePiece model trained on ``corpus`` in code.

    Ids follow T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2. ``vocab_size`` is an upper bound
    (a tiny corpus supports fewer pieces).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model.getvalue())
        return T5TokenizerFast.from_pretrained(folder, extra_ids=0, model_max_length=512)


def _seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """``build()`` in eval mode, its random weights drawn with the global RNG seeded to ``seed`` (and left
    as it was afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


#: The tiny transformer's ``FluxTransformer2DModel`` configuration (``sum(axes_dims_rope)`` must equal
#: ``attention_head_dim``): one double and one single block, two heads of 16, a guidance embedding like FLUX.1-dev.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def tiny_flux_transformer(*, seed: int = 0, **config: Any) -> FluxTransformer2DModel:
    """A tiny random ``FluxTransformer2DModel``: :data:`TINY_TRANSFORMER_CONFIG` with ``config``'s entries in place
    of its own (``in_channels=``, ``guidance_embeds=``, ...)."""
    config = {**TINY_TRANSFORMER_CONFIG, **config}
    config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    return _seeded(seed, lambda: FluxTransformer2DModel(**config))


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 32, seed: int = 0) -> CLIPTextModel:
    """A tiny random ``CLIPTextModel`` matching ``tokenizer``'s vocabulary and special ids."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed + 1, lambda: CLIPTextModel(config))


def tiny_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A tiny random ``T5EncoderModel`` matching ``tokenizer``'s vocabulary."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed + 2, lambda: T5EncoderModel(config))


def tiny_vae(latent_channels: int = 4, width: int = 8, seed: int = 0) -> AutoencoderKL:
    """A tiny random ``AutoencoderKL`` with Flux's 8x downsampling (4 resolution levels) and scale/shift."""
    return _seeded(seed + 3, lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(width,) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        # Flux's VAE normalisation constants (vae/config.json of FLUX.1-dev).
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ))


def tiny_flux_components(
    *, guidance_embeds: bool = True, latent_channels: int = 4, seed: int = 0
) -> dict[str, Any]:
    """All components of a tiny random FluxPipeline, keyed as ``FluxPipeline(**components)`` expects.

    Args:
        guidance_embeds: a guidance-distilled transformer like FLUX.1-dev (``True``) or one without the
            guidance embedding like FLUX.1-schnell (``False``; the scheduler then has no dynamic shift).
        latent_channels: VAE latent channels; the transformer sees ``4 * latent_channels`` per token.
        seed: seed of the random weights (the global RNG is left untouched).
    """
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=32, seed=seed)
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, d_model=32, seed=seed)
    transformer = tiny_flux_transformer(
        in_channels=4 * latent_channels,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds,
        seed=seed,
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    else:  # FLUX.1-schnell's scheduler: a plain linspace (no shift).
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        )
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "vae": tiny_vae(latent_channels=latent_channels, seed=seed),
        "scheduler": scheduler,
    }


def save_tiny_flux_pipeline(folder: str | Path, **component_kwargs: Any) -> Path:
    """Write a tiny random FluxPipeline to ``folder`` in diffusers' layout and return the folder.

    The folder holds ``model_index.json`` and ``transformer/``, ``text_encoder/``, ``text_encoder_2/``,
    ``tokenizer/``, ``tokenizer_2/``, ``vae/``, ``scheduler/``, exactly as ``FluxPipeline.save_pretrained``
    writes FLUX.1-dev, so both :meth:`FluxBackbone.from_pretrained` and ``FluxPipeline.from_pretrained``
    load it. ``component_kwargs`` go to :func:`tiny_flux_components`.
    """
    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(**component_kwargs)).save_pretrained(folder, safe_serialization=True)
    return folder


class TinyFluxBackbone(FluxBackbone):
    """The backbone ``"tiny-flux"``: a tiny random FluxPipeline (:func:`tiny_flux_components`) at 64x64 pixels and
    16 T5 tokens, the real-Flux code path end to end in seconds.

    Its only reward is ``"tiny-random-clip"``, a CLIP score over a tiny random open_clip drawn from the run's seed:
    there is no trained reward model for random images, so whatever reward a script names, it scores with that one.
    """

    @classmethod
    def random(
        cls, *, seed: int = 0, device: torch.device | str = "cpu", num_steps: int | None = None
    ) -> TinyFluxBackbone:
        """The tiny random Flux with weights drawn from ``seed`` (the global RNG is left untouched), on ``device``."""
        pipe = FluxPipeline(**tiny_flux_components(seed=seed))
        return cls.from_pipeline(pipe, height=64, width=64, max_sequence_length=16, num_steps=num_steps).to(device)

    def default_reward(self) -> str:
        return "tiny-random-clip"

    def build_reward(self, name: str | None = None, *, seed: int = 0, **kwargs: Any) -> nn.Module:
        """The tiny random CLIP score drawn from ``seed``, whatever ``name`` and ``kwargs`` ask for."""
        return super().build_reward(self.default_reward(), seed=seed)
