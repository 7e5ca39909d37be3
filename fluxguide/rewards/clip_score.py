"""CLIP text-image similarity as a reward (Hessel et al. 2021, "CLIPScore", without the clip at zero).

The reward is ``scale * cos(E_img(image), E_txt(prompt))`` for any open_clip architecture. Prompts repeat
across a training run (several samples per prompt, a fixed prompt set), so their text embeddings are
cached; the image path is differentiable end to end.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel
from fluxguide.rewards.open_clip_models import image_embeddings, load_open_clip, text_embeddings
from fluxguide.rewards.preprocess import CLIPPreprocess


class CLIPScore(RewardModel):
    """Cosine similarity of open_clip image and text embeddings.

    Args:
        model: an open_clip model (``encode_image``, ``encode_text``), e.g. from ``open_clip.create_model``.
        tokenizer: its open_clip tokenizer (``open_clip.get_tokenizer``).
        scale: multiplies the cosine similarity (1 gives values in [-1, 1]; CLIPScore uses 2.5, many
            RL papers 100).
        preprocess: image preprocessing; by default the model's own open_clip preprocess config.
        cache_text: keep text embeddings of seen prompts (computed without gradients). Call
            :meth:`clear_text_cache` after changing the text tower's weights.
        text_cache_size: at most this many prompts are kept (least recently used are dropped).
    """

    differentiable = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        scale: float = 1.0,
        preprocess: CLIPPreprocess | None = None,
        cache_text: bool = True,
        text_cache_size: int = 65536,
    ) -> None:
        super().__init__()
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise TypeError(
                f"model must be an open_clip model with encode_image and encode_text, got {type(model).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.preprocess = preprocess if preprocess is not None else CLIPPreprocess.from_model(model)
        self.cache_text = cache_text
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | os.PathLike[str] | None,
        *,
        model_cfg: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        **kwargs: Any,
    ) -> CLIPScore:
        """Build from an open_clip architecture name and a local checkpoint file or pretrained tag.

        Args:
            model_name: open_clip architecture (e.g. ``"ViT-L-14"``) or the name of ``model_cfg``.
            pretrained: checkpoint file (``.safetensors`` / ``torch.save`` state dict) or pretrained tag.
            model_cfg: an open_clip config dict for an architecture open_clip does not ship.
            device: where to put the model.
            precision: open_clip precision string.
            **kwargs: passed to :class:`CLIPScore` (``scale``, ``cache_text``, ...).
        """
        model, tokenizer = load_open_clip(
            model_name, pretrained, model_cfg=model_cfg, device=device, precision=precision
        )
        return cls(model, tokenizer, **kwargs)

    def clear_text_cache(self) -> None:
        """Forget cached text embeddings (after the text tower's weights changed)."""
        self._text_cache.clear()

    def text_features(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Normalised float32 text embeddings ``(B, D)``, one per prompt, on ``device``."""
        if not self.cache_text:
            return text_embeddings(self.model, self.tokenizer, prompts, device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            # One prompt per call: a text tower's output can depend (in the last bits) on what else shares its
            # batch, and a cache filled batch by batch would make the scores depend on the run's history (a
            # resumed run, starting with an empty cache, would then differ from the uninterrupted one).
            with torch.no_grad():
                new = torch.cat([text_embeddings(self.model, self.tokenizer, [p], device) for p in missing])
            for prompt, emb in zip(missing, new):
                self._text_cache[prompt] = emb
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        out = torch.stack([self._text_cache[p] for p in prompts]).to(device)
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return out

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_embeddings(image_embeddings(self.model, self.preprocess, images), prompts)

    def score_embeddings(self, img: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The score from normalised image embeddings ``(B, D)`` (what :meth:`score` computes after the image
        tower; a learned reward on the same embeddings reads it without a second pass)."""
        txt = self.text_features(prompts, img.device)
        return self.scale * (img * txt).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, cache_text={self.cache_text}"


class CLIPCaptionLogProb(CLIPScore):
    """CLIP's zero-shot log-probability of the prompt among candidate captions (a contrastive CLIP score).

    ``log softmax_j(logit_scale * cos(image, caption_j))`` at the prompt, over ``candidates`` plus the prompt.
    Unlike the raw similarity, whose value is dominated by what every caption of an image shares (its
    colours, say), this rewards exactly what tells the prompt apart from the other captions, as CLIP's
    zero-shot classification does (Radford et al. 2021, section 3.1.2). Differentiable like :class:`CLIPScore`.

    Args:
        model, tokenizer: an open_clip model and its tokenizer.
        candidates: the competing captions (e.g. every caption of the shapes world's grammar).
        **kwargs: :class:`CLIPScore` options.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, candidates: list[str], **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if not candidates:
            raise ValueError("CLIPCaptionLogProb needs at least one candidate caption")
        self.candidates = list(dict.fromkeys(candidates))

    def score_embeddings(self, img: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        captions = list(dict.fromkeys([*self.candidates, *prompts]))
        index = {c: i for i, c in enumerate(captions)}
        txt = self.text_features(captions, img.device)
        logit_scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 100.0
        logp = torch.log_softmax(logit_scale * img @ txt.T, dim=-1)
        target = torch.tensor([index[p] for p in prompts], device=img.device)
        return self.scale * logp.gather(1, target[:, None]).squeeze(1)

