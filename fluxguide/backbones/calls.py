"""Counting base-model calls: the cost a user pays for, whatever the machine.

Wall time depends on the machine and on what else runs on it; the number of times the base model runs does not.
Every backbone built by :func:`fluxguide.backbones.registry.build_backbone` counts its calls in this process's
:data:`MODEL_CALLS`, per image (one image through the model at one time step is one forward; a batch of 16 under
CFG is 32), in the phase that is current (``"train"`` unless a :meth:`ModelCalls.phase` block says otherwise, as
the held-out evaluations of :class:`fluxguide.harness.run.Run` do). A backward through the model is counted when
the gradient reaches the model's output; :attr:`ModelCalls.cost` weighs it as two forwards (the usual estimate of
a backward's cost). A forward recomputed by gradient checkpointing is a forward that ran, and counts as one.

The training scripts log the counts as ``perf/model_calls`` (training, in forward-equivalents) and
``perf/eval_model_calls`` (held-out evaluations); ``benchmarks/time_to_quality.py`` adds them over a chain's stages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: The attribute listing the counters a module's calls already go to.
_COUNTED = "_fluxguide_counted"


class ModelCalls:
    """Per-image forward and backward calls of the base model, by phase."""

    def __init__(self) -> None:
        self.forwards: Counter[str] = Counter()
        self.backwards: Counter[str] = Counter()
        self.current = "train"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the calls made inside the block under ``name`` (e.g. ``"eval"``)."""
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def cost(self, phase: str = "train") -> int:
        """Forward-equivalents spent in ``phase``: forwards plus two per backward."""
        return self.forwards[phase] + 2 * self.backwards[phase]

    def reset(self) -> None:
        self.forwards.clear()
        self.backwards.clear()

    def attach(self, model: nn.Module) -> nn.Module:
        """Count ``model``'s calls from now on (once per module, however often it is attached); returns it."""
        counters = getattr(model, _COUNTED, [])
        if any(counter is self for counter in counters):
            return model
        model.register_forward_hook(self._on_forward, with_kwargs=True)
        setattr(model, _COUNTED, [*counters, self])
        return model

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            return
        batch, phase = int(output.shape[0]), self.current
        self.forwards[phase] += batch
        if output.requires_grad:
            # Fires when a backward pass reaches this output, i.e. once per backward through this call.
            def on_backward(grad: torch.Tensor) -> None:
                self.backwards[phase] += batch

            output.register_hook(on_backward)


#: This process's counter (each training stage is one process).
MODEL_CALLS = ModelCalls()
