"""The seed's ``GuidanceModelTrainer``: supervised and one-step reward training of a guidance model.

::

    trainer = GuidanceModelTrainer(model, optimizer)
    metrics = trainer.train_step(img, pred, txt, vec, timestep, step_idx, target_correction)
    metrics = trainer.train_from_reward(img, pred, txt, vec, timestep, step_idx, reward_fn=reward_fn,
                                        num_guidance_steps=10)
    trainer.save_checkpoint("my_guidance.pt")

Checkpoint files (no pickle either way; both written atomically):

- ``*.pt`` / ``*.pth``: a torch file holding only tensors and primitive containers,
  ``{"model_state_dict", "optimizer_state_dict", "config", "step", "format"}``, so the seed's
  ``torch.load("my_guidance.pt", weights_only=True)["model_state_dict"]`` works.
- any other suffix (``*.safetensors``): the weights with the model's config in the file's metadata (so
  :func:`fluxguide.policies.load_guidance_model` opens it), and the optimizer state in a sibling
  ``<name>.optimizer.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from fluxguide.algos.common import optimizer_step
from fluxguide.algos.reward_gradient import predicted_clean_latent
from fluxguide.checkpointing import CONFIG_METADATA_KEY, decode_tree, encode_tree
from fluxguide.policies.base import BaseGuidanceModel
from fluxguide.serialization import atomic_output, save_safetensors_atomic

TORCH_SUFFIXES = (".pt", ".pth")
FORMAT = "fluxguide-guidance-trainer/1"


def optimizer_sidecar(path: Path) -> Path:
    """Where the optimizer state of a safetensors checkpoint ``path`` lives."""
    return path.with_name(f"{path.stem}.optimizer.safetensors")


class GuidanceModelTrainer:
    """Training utilities for a guidance model (the seed's class).

    Args:
        model: the guidance model (any ``nn.Module`` with the guidance signature; a
            :class:`~fluxguide.policies.BaseGuidanceModel` also gets its config saved with checkpoints).
        optimizer: over the model's parameters.
        guidance_scale: scale of the correction in :meth:`train_from_reward` (as in sampling).
        max_grad_norm: clip the global gradient norm (``None``: no clipping).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        guidance_scale: float = 1.0,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.guidance_scale = guidance_scale
        self.max_grad_norm = max_grad_norm
        self.step = 0

    def _apply(self, loss: torch.Tensor) -> float:
        """Backward and optimizer step, refusing non-finite losses and gradients; returns the grad norm."""
        grad_norm = optimizer_step(loss, self.optimizer, max_grad_norm=self.max_grad_norm)
        self.step += 1
        return grad_norm

    def train_step(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor,
        step_idx: int | torch.Tensor,
        target_correction: torch.Tensor,
    ) -> dict[str, float]:
        """One supervised step: MSE between the model's correction and ``target_correction``.

        Returns:
            ``{"loss": mse, "grad_norm": ..., "correction_rms": ...}``.
        """
        self.model.train()
        correction = self.model(img, pred, txt, vec, timestep, step_idx)
        if correction.shape != target_correction.shape:
            raise ValueError(
                f"target_correction has shape {tuple(target_correction.shape)} but the model's correction has "
                f"{tuple(correction.shape)}: targets must be shaped like pred (B, seq, C)"
            )
        loss = F.mse_loss(correction.float(), target_correction.to(correction.device).float())
        grad_norm = self._apply(loss)
        return {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "correction_rms": float(correction.detach().float().square().mean().sqrt()),
        }

    def train_from_reward(
        self,
        img: torch.Tensor,
        pred: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        timestep: torch.Tensor | float,
        step_idx: int | torch.Tensor,
        reward_fn: Callable[[torch.Tensor], torch.Tensor],
        num_guidance_steps: int = 1,
    ) -> dict[str, float]:
        """One-step reward training on one observation (the seed's form).

        The guided prediction gives the predicted clean latent ``x0 = img - t * (pred + scale * correction)``
        and the loss is ``-mean(reward_fn(x0))``; ``reward_fn`` takes that packed latent (decode it inside,
        as in the seed's ``aesthetic_reward(latent)``) and returns ``(B,)`` or a scalar, higher is better.

        Args:
            num_guidance_steps: optimizer steps taken on this observation (each recomputes the correction
                with the updated model).

        Returns:
            ``{"loss", "reward", "reward_before", "grad_norm", "correction_rms"}`` (of the last step;
            ``reward_before`` is the first step's reward).
        """
        if num_guidance_steps < 1:
            raise ValueError(f"num_guidance_steps must be >= 1, got {num_guidance_steps}")
        self.model.train()
        first_reward = None
        metrics: dict[str, float] = {}
        for _ in range(num_guidance_steps):
            correction = self.model(img, pred, txt, vec, timestep, step_idx)
            x0 = predicted_clean_latent(img, pred, correction, timestep, self.guidance_scale)
            reward = torch.as_tensor(reward_fn(x0))
            if reward.ndim > 1 or (reward.ndim == 1 and reward.shape[0] not in (1, img.shape[0])):
                raise ValueError(
                    f"reward_fn must return a scalar or one reward per sample ({img.shape[0]},), got shape "
                    f"{tuple(reward.shape)}"
                )
            if not reward.requires_grad:
                raise ValueError(
                    "reward_fn's output does not depend differentiably on the predicted latent (no grad_fn): "
                    "compute it with torch operations and without torch.no_grad()"
                )
            reward_mean = reward.float().mean()
            first_reward = float(reward_mean.detach()) if first_reward is None else first_reward
            grad_norm = self._apply(-reward_mean)
            metrics = {
                "loss": float(-reward_mean.detach()),
                "reward": float(reward_mean.detach()),
                "grad_norm": grad_norm,
                "correction_rms": float(correction.detach().float().square().mean().sqrt()),
            }
        metrics["reward_before"] = float(first_reward)
        return metrics

    # ------------------------------------------------------------------------------------------ files
    def _config(self) -> dict[str, Any] | None:
        return self.model.config if isinstance(self.model, BaseGuidanceModel) else None

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the model (with its config) and the optimizer state atomically; see the module docstring."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in TORCH_SUFFIXES:
            payload = {
                "format": FORMAT,
                "model_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer_state_dict": self.optimizer.state_dict(),
                "config": self._config(),
                "step": self.step,
            }
            with atomic_output(path) as tmp:  # atomic, and never through a link
                torch.save(payload, tmp)
            return path
        config = self._config()
        metadata = {"format": FORMAT, "step": str(self.step)}
        if config is not None:
            metadata[CONFIG_METADATA_KEY] = json.dumps(config)
        tensors: dict[str, torch.Tensor] = {}
        structure = encode_tree(self.optimizer.state_dict(), tensors, "optimizer")
        # Optimizer first: a crash between the two writes leaves new optimizer moments with old weights,
        # which is harmless, rather than new weights without their moments.
        save_safetensors_atomic(tensors, optimizer_sidecar(path), metadata={"structure": json.dumps(structure)})
        save_safetensors_atomic(self.model.state_dict(), path, metadata=metadata)
        return path

    def load_checkpoint(self, path: str | Path, *, load_optimizer: bool = True) -> dict[str, Any]:
        """Load a file written by :meth:`save_checkpoint` into the model (and optimizer); returns its info.

        Returns:
            ``{"config": model config or None, "step": int}``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"guidance checkpoint {path} does not exist")
        if path.suffix in TORCH_SUFFIXES:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "model_state_dict" not in payload:
                raise ValueError(f"{path} is not a guidance checkpoint (no 'model_state_dict' entry)")
            self.model.load_state_dict(payload["model_state_dict"])
            if load_optimizer and "optimizer_state_dict" in payload:
                self.optimizer.load_state_dict(payload["optimizer_state_dict"])
            self.step = int(payload.get("step", 0))
            return {"config": payload.get("config"), "step": self.step}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        self.model.load_state_dict(load_file(str(path)))
        sidecar = optimizer_sidecar(path)
        if load_optimizer:
            if not sidecar.is_file():
                raise FileNotFoundError(
                    f"{path} has no optimizer state beside it ({sidecar.name}); pass load_optimizer=False to "
                    f"load the weights only"
                )
            with safe_open(str(sidecar), framework="pt") as f:
                structure = json.loads((f.metadata() or {})["structure"])
            self.optimizer.load_state_dict(decode_tree(structure, load_file(str(sidecar))))
        self.step = int(metadata.get("step", 0))
        config = metadata.get(CONFIG_METADATA_KEY)
        return {"config": json.loads(config) if config else None, "step": self.step}
