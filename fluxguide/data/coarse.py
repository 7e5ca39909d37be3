"""Few-step distillation targets: what one coarse step should do, from a teacher run at many steps.

A student that samples in ``K`` steps makes one Euler step over each coarse interval ``[t_k, t_{k+1}]`` of the
``K``-step schedule. Its target there is the teacher's displacement over that interval: run the teacher at ``K * m``
steps (whose schedule holds the ``K``-step one: Flux's schedule is a warped linspace, and ``linspace(1, 0, K + 1)``
is every ``m``-th point of ``linspace(1, 0, K m + 1)``), and take

    v_k = (x_teacher(t_{k+1}) - x_teacher(t_k)) / (t_{k+1} - t_k),       target_k = v_k - pred(x_k, t_k),

the correction with which a single Euler step from the teacher's state ``x_k`` lands exactly where its ``m`` fine
steps land. Along the teacher's own trajectory ``v_k`` is the ``dt``-weighted mean of the fine steps' guided
velocities (:func:`coarsen`, no model call); from a state the teacher did not visit (a prompt swap) the teacher is
rolled out over the interval (:func:`relabel_coarse`, ``m`` steps). This is the displacement matching of
progressive and consistency-style distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models"; Frans et al. 2024, "One Step Diffusion via Shortcut Models"), on the guidance correction alone:
the base model stays frozen.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from fluxguide import keys
from fluxguide.backbones.base import Backbone
from fluxguide.sampling.conditioning import Conditioning
from fluxguide.sampling.denoise import GuidanceFn, guided_prediction
from fluxguide.sampling.instrumented import NEXT_IMG, PRED_USED, T_PREV
from fluxguide.sampling.steps import euler_step


def substeps(fine_steps: int, coarse_steps: int) -> int:
    """Fine steps per coarse step, ``m = fine_steps / coarse_steps``; raises unless ``coarse_steps`` divides
    ``fine_steps`` (only then does the fine schedule hold the coarse one)."""
    if not isinstance(coarse_steps, int) or coarse_steps < 1:
        raise ValueError(f"coarse_steps must be an integer >= 1, got {coarse_steps!r}")
    if fine_steps % coarse_steps:
        fix = coarse_steps * -(-fine_steps // coarse_steps)  # the next multiple
        raise ValueError(f"the teacher's {fine_steps} steps are not a multiple of coarse_steps={coarse_steps}: the "
                         f"fine schedule must hold the coarse one; collect at a multiple, e.g. {fix} steps")
    return fine_steps // coarse_steps


def coarsen(states: TensorDict, targets: torch.Tensor, coarse_steps: int) -> tuple[TensorDict, torch.Tensor]:
    """The teacher trajectory's states at the coarse times, each with its coarse-step target.

    Args:
        states: ``denoise_with_state_collection``'s states ``[B]`` of an ODE trajectory with ``T`` fine steps.
        targets: the correction the teacher applied at every fine step ``(B, T, seq, C)`` (``pred_used - pred``
            at guidance scale 1), so that the fine step ``j`` moved ``x`` by ``(t_{j+1} - t_j)(pred_j + target_j)``.
        coarse_steps: ``K``, a divisor of ``T``.

    Returns:
        ``(states, targets)`` with ``K`` steps: ``img``, ``pred``, ``t`` at fine step ``k m``, ``t_prev`` the next
        coarse time, ``step`` = ``k``, and the target ``v_k - pred_k`` (see the module docstring).
    """
    t, t_next = states[keys.T].float(), states[T_PREV].float()
    b, fine = t.shape
    m = substeps(fine, coarse_steps)
    dt = (t_next - t)[..., None, None]  # (B, T, 1, 1), negative
    move = (dt * (states[keys.PRED].float() + targets.float())).reshape(b, coarse_steps, m, *targets.shape[2:])
    span = dt.reshape(b, coarse_steps, m, 1, 1).sum(2)  # t_{k+1} - t_k
    first = torch.arange(coarse_steps, device=t.device) * m
    pred = states[keys.PRED][:, first]
    coarse_targets = (move.sum(2) / span - pred.float()).to(targets.dtype)
    out = states.clone(recurse=False)
    for key in (PRED_USED, NEXT_IMG):  # fine-step quantities: the coarse step's are not recorded
        if key in out.keys():  # noqa: SIM118 (a TensorDict refuses `in` itself)
            del out[key]
    for key in (keys.IMG, keys.PRED, keys.T):
        out[key] = states[key][:, first]
    out[T_PREV] = t_next[:, first + m - 1].to(states[T_PREV].dtype)
    out[keys.STEP] = torch.arange(coarse_steps, device=t.device).expand(b, -1).to(states[keys.STEP].dtype)
    return out, coarse_targets


@torch.no_grad()
def relabel_coarse(backbone: Backbone, states: TensorDict, cond: Conditioning, teacher: GuidanceFn,
                   fine_times: list[float]) -> tuple[TensorDict, torch.Tensor]:
    """Coarse ``states`` (of :func:`coarsen`) seen under ``cond`` (one prompt per episode), with the coarse target of
    ``teacher`` rolled out from each state under that prompt over the fine steps of its interval.

    ``fine_times`` is the teacher's schedule (``K m + 1`` times). Costs ``m`` base calls per coarse step, plus the
    teacher's own (CFG: one more per fine step), the same as relabelling every fine state would.
    """
    b, coarse_steps = states[keys.T].shape
    m = substeps(len(fine_times) - 1, coarse_steps)
    if cond.batch_size != b:
        raise ValueError(f"cond must hold one prompt per episode: {b} episodes, {cond.batch_size} prompts")
    preds, targets = [], []
    for k in range(coarse_steps):
        x = states[keys.IMG][:, k].float()
        start, first_pred = x, None
        for j in range(k * m, (k + 1) * m):  # the teacher's own sampler steps (fluxguide.sampling.denoise)
            pred, pred_used = guided_prediction(backbone, x, cond, backbone.default_guidance, fine_times[j], j,
                                                teacher, 1.0)
            first_pred = pred if first_pred is None else first_pred
            x = euler_step(x, pred_used, fine_times[j], fine_times[j + 1])
        assert first_pred is not None
        preds.append(first_pred)
        targets.append((x - start) / (fine_times[(k + 1) * m] - fine_times[k * m]) - first_pred)
    relabelled = states.clone(recurse=False)
    relabelled[keys.TXT], relabelled[keys.VEC] = cond.txt, cond.vec
    relabelled[keys.PRED] = torch.stack(preds, dim=1).to(states[keys.PRED].dtype)
    return relabelled, torch.stack(targets, dim=1).to(states[keys.PRED].dtype)
