"""The LAION improved aesthetic predictor and the reward built on it.

The predictor is an MLP on the L2-normalised CLIP ViT-L/14 image embedding, as published in
christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``): ``Linear(768, 1024)``,
``Dropout(0.2)``, ``Linear(1024, 128)``, ``Dropout(0.2)``, ``Linear(128, 64)``, ``Dropout(0.1)``,
``Linear(64, 16)``, ``Linear(16, 1)``, with no activations (the ReLUs are commented out there), held in
``self.layers`` so the published state dict ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.0``,
``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) loads as is. Input and hidden sizes are arguments,
so the shapes world's aesthetic head (an MLP of the same layout on the tiny CLIP embedding) is the same
class.
"""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxguide.rewards.base import RewardModel
from fluxguide.rewards.open_clip_models import embed_dim, image_embeddings, load_open_clip
from fluxguide.rewards.preprocess import CLIPPreprocess

#: The published predictor's layout (input 768 = CLIP ViT-L/14 embedding).
LAION_INPUT_DIM = 768
LAION_HIDDEN = (1024, 128, 64, 16)
LAION_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticPredictor(nn.Module):
    """MLP from a normalised CLIP image embedding to a scalar score, in the LAION predictor's layout.

    ``layers`` holds ``Linear(input_dim, hidden[0])``, then for each further size a ``Linear``; the first
    ``len(dropouts)`` linears are each followed by a ``Dropout``. There are no activations, as published.

    Args:
        input_dim: CLIP embedding size (768 for ViT-L/14).
        hidden: hidden sizes.
        dropouts: dropout probabilities after the first linears (inactive in eval mode).
    """

    def __init__(
        self,
        input_dim: int = LAION_INPUT_DIM,
        hidden: Sequence[int] = LAION_HIDDEN,
        dropouts: Sequence[float] = LAION_DROPOUTS,
    ) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropouts = tuple(float(p) for p in dropouts)
        if len(self.dropouts) > len(self.hidden):
            raise ValueError(
                f"got {len(self.dropouts)} dropouts for {len(self.hidden)} hidden layers; pass at most one "
                f"dropout per hidden layer."
            )
        sizes = (self.input_dim, *self.hidden, 1)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(self.dropouts):
                layers.append(nn.Dropout(self.dropouts[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores ``(B,)`` of normalised embeddings ``(B, input_dim)``."""
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.input_dim:
            raise ValueError(
                f"AestheticPredictor expects embeddings of shape (B, {self.input_dim}), got "
                f"{tuple(embeddings.shape)}; its input_dim must equal the CLIP model's embedding size."
            )
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        input_dim: int = LAION_INPUT_DIM,
        hidden: Sequence[int] = LAION_HIDDEN,
        dropouts: Sequence[float] = LAION_DROPOUTS,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AestheticPredictor:
        """Build a predictor and load its weights (see :meth:`load_weights`); it is returned in eval mode,
        with frozen parameters.

        The defaults fit the published ``sac+logos+ava1-l14-linearMSE.pth``.
        """
        predictor = cls(input_dim, hidden, dropouts)
        predictor.load_weights(path)
        return predictor.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a state dict from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a plain state dict, or its keys or shapes differ from this
                predictor's (the message names them).
        """
        self.load_state_dict_checked(read_state_dict(path), source=os.fspath(path))

    def load_state_dict_checked(
        self, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
    ) -> None:
        """``load_state_dict`` with errors that name missing / unexpected keys and mismatched shapes."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        layout = f"input_dim={self.input_dim}, hidden={self.hidden}, dropouts={self.dropouts}"
        if missing or unexpected:
            problems = ", ".join(
                f"{what} keys {keys}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
            raise ValueError(
                f"{source} does not fit AestheticPredictor({layout}): {problems}. Pass the hidden sizes and "
                f"dropouts the checkpoint was trained with (its keys: {sorted(state_dict)})."
            )
        wrong = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(state_dict[k].shape) != tuple(v.shape)
        ]
        if wrong:
            raise ValueError(
                f"{source} has shapes that do not fit AestheticPredictor({layout}): {wrong}. Pass the input_dim "
                f"and hidden sizes the checkpoint was trained with."
            )
        self.load_state_dict(dict(state_dict))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden={self.hidden}"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``.safetensors`` or a ``torch.save`` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"weights file {str(path)!r} is not a readable safetensors file ({e}); it is truncated or not "
                f"safetensors at all: download it again, or write it with safetensors.torch.save_file(state_dict, path)."
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and suggests weights_only=False (running the file's code); keep its reason.
        text = str(e)
        reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
        reason = " ".join(reason.split())[:200] or text.splitlines()[0][:200]
        raise ValueError(
            f"{str(path)!r} is not a plain state dict of tensors (weights_only loading refused it: {reason}); "
            f"save model.state_dict() instead of the model object, or convert it to safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"weights file {str(path)!r} is not a readable torch.save file ({e}); it is truncated or in another "
            f"format: download it again, or save the state dict with safetensors."
        ) from e
    # Lightning checkpoints wrap the state dict.
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors).")
    return dict(obj)


class AestheticReward(RewardModel):
    """``predictor(normalise(clip.encode_image(preprocess(images))))``; prompts are ignored.

    Args:
        clip_model: an open_clip model whose image embedding the predictor was trained on.
        predictor: an :class:`AestheticPredictor` (put in eval mode here).
        preprocess: image preprocessing; by default the CLIP model's own open_clip preprocess config.
    """

    differentiable = True

    def __init__(
        self,
        clip_model: nn.Module,
        predictor: AestheticPredictor,
        *,
        preprocess: CLIPPreprocess | None = None,
    ) -> None:
        super().__init__()
        dim = embed_dim(clip_model)
        if dim is not None and dim != predictor.input_dim:
            raise ValueError(
                f"the CLIP model embeds images in {dim} dimensions but the predictor takes {predictor.input_dim}; "
                f"use the CLIP model the predictor was trained on (ViT-L-14 / openai for the LAION predictor)."
            )
        self.clip_model = clip_model
        self.predictor = predictor.eval()
        self.preprocess = preprocess if preprocess is not None else CLIPPreprocess.from_model(clip_model)

    @classmethod
    def from_files(
        cls,
        predictor_path: str | os.PathLike[str],
        *,
        clip_model_name: str = "ViT-L-14",
        clip_pretrained: str | os.PathLike[str] | None = "openai",
        clip_model_cfg: dict[str, Any] | None = None,
        input_dim: int = LAION_INPUT_DIM,
        hidden: Sequence[int] = LAION_HIDDEN,
        dropouts: Sequence[float] = LAION_DROPOUTS,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> AestheticReward:
        """The LAION predictor from ``predictor_path`` on open_clip ViT-L-14 (OpenAI weights) by default.

        ``clip_pretrained`` may be a local checkpoint file or an open_clip tag (the tag resolves from
        open_clip's local cache, downloading only if it is not there).
        """
        clip_model, _ = load_open_clip(
            clip_model_name, clip_pretrained, model_cfg=clip_model_cfg, device=device, precision=precision
        )
        predictor = AestheticPredictor.from_file(
            predictor_path, input_dim=input_dim, hidden=hidden, dropouts=dropouts, device=device
        )
        return cls(clip_model, predictor)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = image_embeddings(self.clip_model, self.preprocess, images)
        weight = next(self.predictor.parameters())
        return self.predictor(emb.to(device=weight.device, dtype=weight.dtype))
