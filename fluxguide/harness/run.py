"""A training run's bookkeeping, shared by every training script: what is not the algorithm.

:class:`Run` sets up the process (distributed init and device, threads, seed), resumes from the run folder's
latest checkpoint (refusing one written against another base model, or under other options without
``--allow-config-change``), opens the :class:`Tracker`, and drives
the update loop: the progress bar, the samples seen, the time and sample budgets (agreed over ranks), the
held-out evaluation and checkpoint cadence, a uniform stop on a non-finite loss, and the final
``guidance.safetensors`` and curves plot. A script reads top to bottom::

    run = Run(cfg.run, cfg, name="ppo")
    ... build the backbone, reward, policy and algorithm on run.device ...
    run.resume(backbone, modules, optimizers, generators, tags=(...))
    run.evaluate_with(HeldoutEvaluator(...) if distributed.is_main() else None, policy)
    for update in run.loop(samples_per_update=cfg.optim.batch_size):
        metrics = run.step(algo.update)
        run.log(metrics, train=("reward_mean", ...), losses=("loss", ...))
    run.finish(policy)

Checkpoints keep the layout the scripts always wrote: the modules, optimizers and generators under the names
the script gives, and ``state`` with ``samples_seen`` (or ``pairs_seen``), ``elapsed_seconds``, ``algorithm`` (the
script's name for it, as in the progress bar),
``backbone_fingerprint``, ``config`` (the flat flags), ``last_eval`` and any :attr:`Run.extra_state`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fluxguide import distributed
from fluxguide.backbones.calls import MODEL_CALLS
from fluxguide.checkpointing import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from fluxguide.errors import UserError
from fluxguide.harness.config import RunConfig, check_resume_config, flat_config, validate
from fluxguide.harness.monitoring import RewardMonitor
from fluxguide.harness.progress import PROGRESS_FILE, write_progress
from fluxguide.harness.tracking import METRICS_FILE, TRACKING_FILE, Tracker
from fluxguide.locking import FolderLock
from fluxguide.provenance import backbone_fingerprint, check_resume_fingerprint
from fluxguide.rewards.base import REGISTRY_NAME_ATTR
from fluxguide.serialization import refuse_links

#: The eval metric shown next to the training metrics in the progress bar.
BAR_EVAL_METRIC = "eval/verifier_pass_rate"
#: What a run writes in its folder (besides the lock file, which FolderLock checks).
RUN_OUTPUTS = (METRICS_FILE, TRACKING_FILE, "curves.png", "samples", "guidance.safetensors", CHECKPOINTS_DIR,
               PROGRESS_FILE)
#: The signals that end a run with a checkpoint: Ctrl-C, ``kill``, and a closed terminal or SSH session.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(text: str, stream: str = "stdout") -> None:
    """Write ``text`` to ``sys.<stream>`` and flush it. After a hang-up the terminal is gone and writing to it
    fails (EIO): the stream is then replaced by ``os.devnull``, so an interrupted run still saves its checkpoint,
    frees its folder and exits with its status instead of failing on a message nobody can read."""
    try:
        out = getattr(sys, stream)
        out.write(text)
        out.flush()
    except (OSError, ValueError):  # ValueError: the stream was closed
        setattr(sys, stream, open(os.devnull, "w"))  # noqa: SIM115 - open while the process lives


class Run:
    """One training run in ``cfg.run_dir``.

    Args:
        cfg: the shared run options.
        config: the script's whole config (recorded, flattened, in W&B and every checkpoint).
        name: the progress bar's label.
        unit: what one training sample is called: the checkpoint's counter is ``<unit>s_seen``
            (``samples_seen``; behaviour cloning counts ``pairs_seen``).
        hint: what to try after a non-finite loss (shown in the stop message).
    """

    def __init__(self, cfg: RunConfig, config: Any, *, name: str, unit: str = "sample", hint: str = "lower --lr") -> None:
        validate(config if is_dataclass(config) else cfg)  # every option, before anything is loaded (ConfigError)
        self.cfg, self.name, self.unit, self.hint = cfg, name, unit, hint
        self.device = distributed.init_distributed(cfg.device)  # this rank's device (a no-op without torchrun)
        if distributed.is_main():  # a link planted where the run writes: refused now, not after the training
            for output in RUN_OUTPUTS:
                refuse_links(Path(cfg.run_dir) / output)
        # One writer per run folder: a second process on it stops here, naming the owner (rank 0 writes the files).
        self.lock = FolderLock(cfg.run_dir, "run folder").acquire() if distributed.is_main() else None
        self._signal: int | None = None  # SIGINT / SIGTERM / SIGHUP received during the loop
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if "RL_LOGGING_LEVEL" not in os.environ:  # torchrl's INFO lines ("Initialized LazyTensorStorage ...")
            logging.getLogger("torchrl").setLevel(logging.WARNING)  # on stdout say nothing about the run
        self.config = flat_config(config)
        self._check_resume_config()  # before anything is loaded: a refused resume costs nothing
        self.update = 0  # updates done
        self.samples_seen = 0  # training samples over all ranks
        self.state: dict[str, Any] = {}  # the resumed checkpoint's state ({} on a fresh run)
        self.extra_state: dict[str, Any] = {}  # more state for every checkpoint (e.g. BC's references)
        self.last_eval: dict[str, float] = {}
        self.tracker: Tracker | None = None
        self._evaluate: Callable[[], dict[str, float]] | None = None
        self._elapsed, self._start, self._t0 = 0.0, time.perf_counter(), time.perf_counter()
        self.bar: tqdm | None = None
        self._calls_at_start = {phase: MODEL_CALLS.cost(phase) for phase in ("train", "eval")}  # this process's

    # ------------------------------------------------------------------------------------------- resume
    def _check_resume_config(self) -> None:
        """Refuse to resume the run folder's latest checkpoint under other options than it recorded (a
        :class:`~fluxguide.harness.config.ConfigError` naming each flag), unless ``--allow-config-change``; only
        ``state.json`` is read here (checked against its own SHA-256), the other files when :meth:`resume` loads."""
        ckpt = latest_checkpoint(self.cfg.run_dir)
        if ckpt is None:
            return
        recorded = read_manifest(ckpt).get("state", {}).get("config")
        changes = check_resume_config(recorded, self.config, ckpt, allow=self.cfg.allow_config_change)
        if changes and distributed.is_main():
            print(f"resuming with changed options (--allow-config-change): {'; '.join(changes)}")

    def resume(
        self,
        backbone: nn.Module,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        generators: Mapping[str, torch.Generator],
        *,
        save_generators: Callable[[], Mapping[str, torch.Generator]] | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Continue from the run folder's latest checkpoint, if any, then open the tracker.

        ``modules``, ``optimizers`` and ``generators`` are what every checkpoint holds, under these names
        (``save_generators`` gives the generators to save when they are not ``generators`` themselves).
        Rank 0 restores its RNG streams; every rank then reseeds its own streams for the step. Raises if the
        checkpoint was written against another base model. Returns whether the run resumed.
        """
        self.modules, self.optimizers = dict(modules), dict(optimizers)
        self._save_generators = save_generators or (lambda: generators)
        self.fingerprint = backbone_fingerprint(backbone)  # stored in every checkpoint; a resume must match it
        ckpt = latest_checkpoint(self.cfg.run_dir)
        if ckpt is not None:
            main_rank = distributed.is_main()  # the RNG states saved are rank 0's; other ranks start fresh streams
            loaded = load_checkpoint(ckpt, modules=self.modules, optimizers=self.optimizers,
                                     generators=generators if main_rank else {}, restore_global_rng=main_rank)
            check_resume_fingerprint(loaded.state.get("backbone_fingerprint"), self.fingerprint, ckpt)
            distributed.reseed_rank_streams(self.cfg.seed, *generators.values(), step=loaded.step)
            self.update, self.state = loaded.step, loaded.state
            self.samples_seen, self._elapsed = self.state[self.count_key], self.state["elapsed_seconds"]
            self.last_eval = self.state.get("last_eval", {})
            print(f"resuming from {ckpt} (update {self.update}, {self.samples_seen} {self.unit}s seen)")
        self.tracker = Tracker(self.cfg.run_dir, config=self.config, project=self.cfg.wandb_project,
                               group=self.cfg.wandb_group, mode=self.cfg.wandb_mode,
                               resume_samples_seen=self.samples_seen if ckpt is not None else None, tags=tuple(tags))
        return ckpt is not None

    @property
    def count_key(self) -> str:
        """The checkpoint state's sample counter: ``samples_seen`` or ``pairs_seen``."""
        return f"{self.unit}s_seen"

    # ----------------------------------------------------------------------------------------- evaluate
    def evaluate_with(self, evaluator: Callable[[Any, Tracker, int], dict[str, float]] | None, policy: Any) -> None:
        """Evaluate ``policy`` with ``evaluator(policy, tracker, samples_seen) -> metrics`` (which logs them) at
        the start, every ``eval_every`` updates and at the end. Pass ``None`` on ranks that do not evaluate:
        rank 0 evaluates (fixed noise; every rank holds the same policy)."""
        self._evaluate = None if evaluator is None else (lambda: evaluator(policy, self.tracker, self.samples_seen))

    def evaluate_heldout(self, backbone: nn.Module, reward: nn.Module, policy: Any, *, guidance_scale: float,
                         num_steps: int | None) -> None:
        """Evaluate ``policy`` with a :class:`HeldoutEvaluator` on the run's held-out prompts (built on rank 0),
        with the rewards it is not trained on (:meth:`monitor`)."""
        from fluxguide.harness.evaluation import HeldoutEvaluator

        cfg = self.cfg
        with MODEL_CALLS.phase("eval"):  # the evaluator samples the base sampler's grid column once: evaluation cost
            evaluator = HeldoutEvaluator(
                backbone, reward, cfg.heldout_prompts(), cfg.run_dir, num_grid_prompts=cfg.grid_prompts,
                samples_per_prompt=cfg.eval_samples_per_prompt, seed=cfg.seed, guidance_scale=guidance_scale,
                num_steps=num_steps, monitor=self.monitor(backbone, trained=getattr(reward, REGISTRY_NAME_ATTR, None)),
            ) if distributed.is_main() else None
        self.evaluate_with(evaluator, policy)

    def monitor(self, backbone: nn.Module, *, trained: str | None) -> RewardMonitor:
        """The untrained rewards every held-out evaluation scores (``--monitor-rewards``, default the backbone's),
        ``trained`` (the trained reward's name; ``None`` for behaviour cloning) left out."""
        monitor = RewardMonitor.build(backbone, self.cfg.monitor_rewards, trained=trained, seed=self.cfg.seed)
        if monitor.names and distributed.is_main():
            print(f"held-out evaluations also score the untrained rewards {', '.join(monitor.names)} "
                  "(reward-hacking diagnostics: eval/rewards/<name>)")
        return monitor

    def evaluate(self) -> dict[str, float]:
        """Run the evaluation now (``{}`` on ranks without an evaluator); remembered as :attr:`last_eval`."""
        with MODEL_CALLS.phase("eval"):
            self.last_eval = self._evaluate() if self._evaluate is not None else {}
        return self.last_eval

    # ------------------------------------------------------------------------------------------- loop
    def elapsed(self) -> float:
        """Wall time of the whole run so far, summed over resumes."""
        return time.perf_counter() - self._start

    def budget_used(self) -> str | None:
        """Which budget (time or samples) is used up on this rank, as a sentence; ``None`` if neither."""
        cfg = self.cfg
        if cfg.time_budget_minutes is not None and self.elapsed() >= 60 * cfg.time_budget_minutes:
            return f"time budget of {cfg.time_budget_minutes} min"
        if cfg.total_samples is not None and self.samples_seen >= cfg.total_samples:
            return f"sample budget of {cfg.total_samples} {self.unit}s"
        return None

    def loop(self, *, samples_per_update: int) -> Iterator[int]:
        """Yield the index of each update still to do; after each, evaluate and checkpoint on cadence.

        The body does one update through :meth:`step` and logs it with :meth:`log`. The loop stops at
        ``total_updates`` or once a budget is used up on any rank (with an evaluation and a checkpoint).
        """
        cfg = self.cfg
        self._samples_per_update = samples_per_update * distributed.world_size()
        self._start = time.perf_counter() - self._elapsed
        self._install_signal_handlers()
        if (self.update == 0 and cfg.eval_at_start) or self.state.get("eval_pending"):  # eval_pending: an interrupt
            self.evaluate()                                                          # skipped a due evaluation
        started_at = self.update
        self.bar = tqdm(range(self.update, cfg.total_updates), initial=self.update, total=cfg.total_updates,
                        desc=self.name, disable=not distributed.is_main())
        try:
            for update in self.bar:
                if distributed.any_rank(self._signal is not None):  # interrupted during the evaluation at the start
                    self._exit_interrupted(saved=None if self.update == started_at else self.save_checkpoint())
                if distributed.any_rank(self.budget_used() is not None):  # a resumed run whose budget was used up
                    break
                self._t0 = time.perf_counter()
                yield update
                done = self.update
                if distributed.any_rank(self._signal is not None):
                    # The update in flight is done and logged: save it (and say the evaluation due was skipped),
                    # then exit; the rerun evaluates first if an evaluation was due.
                    due = done % cfg.eval_every == 0 or done == cfg.total_updates
                    self._exit_interrupted(saved=self.save_checkpoint(eval_pending=due) if distributed.is_main()
                                           else None)
                used = self.budget_used()
                stop = distributed.any_rank(used is not None)
                last = done == cfg.total_updates or stop
                if done % cfg.eval_every == 0 or last:
                    self.evaluate()
                if (done % cfg.checkpoint_every == 0 or last) and distributed.is_main():
                    self.save_checkpoint()
                if stop:
                    print(f"{used or 'the budget of another rank'} used up after {done} updates")
                    break
            self.bar.close()
        finally:
            self._restore_signal_handlers()

    # -------------------------------------------------------------------------------------- interrupts
    def _install_signal_handlers(self) -> None:
        """:data:`INTERRUPTS` during the loop: finish the update in flight, checkpoint, exit (a second one exits
        at once). Signal handlers can only be set in the main thread; elsewhere the defaults stay."""
        self._previous_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in INTERRUPTS:
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:  # the second one: exit now, saving nothing more
            say(f"\n{name} again: exiting at once; the last checkpoint is "
                f"{latest_checkpoint(self.cfg.run_dir) or '(none)'}\n", "stderr")
            if self.lock is not None:
                self.lock.release()
            os._exit(128 + signum)
        self._signal = signum
        say(f"\n{name} received: finishing update {self.update + 1}, then saving a checkpoint and "
            f"exiting (press Ctrl-C again to exit at once without saving it)\n", "stderr")

    def _exit_interrupted(self, saved: Path | None) -> None:
        """Close the files and exit with 128 + the signal (130 for SIGINT), without a traceback."""
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.finish()
        signum = self._signal if self._signal is not None else signal.SIGTERM  # another rank's signal
        if distributed.is_main():
            metrics = self.cfg.run_dir / "metrics.jsonl"
            where = (f"saved update {self.update} to {saved}" if saved is not None else
                     f"no update was done since the last checkpoint ({latest_checkpoint(self.cfg.run_dir) or 'none'})")
            say(f"\ninterrupted by {signal.Signals(signum).name}: {where}; metrics in {metrics}.\n"
                f"Resume with the same command (same --run-dir {self.cfg.run_dir}): it continues from update "
                f"{self.update}.\n")
        for stream in ("stdout", "stderr"):  # after a hang-up: drop what is left unwritten, so the status holds
            say("", stream)
        if self.lock is not None:
            self.lock.release()
        distributed.cleanup()
        raise SystemExit(128 + int(signum))

    def step(self, update_fn: Callable[..., dict[str, float]], *args: Any, **kwargs: Any) -> dict[str, float]:
        """One update: ``update_fn(*args, **kwargs) -> metrics``, then count its samples.

        A non-finite loss (:class:`FloatingPointError`, e.g. ``fluxguide.algos.NonFiniteLossError``) stops the run
        with a message naming the last good checkpoint; nothing is written for the failed update.
        """
        try:
            with MODEL_CALLS.phase("train"):
                metrics = update_fn(*args, **kwargs)
        except FloatingPointError as e:
            if self.tracker is not None:
                self.tracker.finish()
            if self.lock is not None:
                self.lock.release()
            last = latest_checkpoint(self.cfg.run_dir)
            # A refusal of the user's input (a reward that returned NaN / inf) is fixed there, not by a lower --lr.
            hint = "fix what the message names" if isinstance(e, UserError) else self.hint
            rerun = ("the run has no checkpoint yet, so rerunning starts it afresh and rewrites its metrics (use "
                     f"another --run-dir to keep them): {hint}." if last is None else f"the last good checkpoint "
                     f"is {last}. Rerunning resumes from it: {hint}" + ("." if isinstance(e, UserError) else
                     ", with --allow-config-change to resume under the changed value."))
            message = f"stopping at update {self.update + 1}: {e}\nNo checkpoint was written for this update; {rerun}"
            if isinstance(e, UserError):  # the user's to fix: exit 2 like every refusal, the message printed here
                say(f"error: {message}\n", "stderr")
                stop = SystemExit(message)  # str(stop) is the message for a caller that catches it
                stop.code = 2
                raise stop from e
            raise SystemExit(message) from e
        self.update += 1
        self.samples_seen += self._samples_per_update
        return metrics

    def log(
        self,
        metrics: Mapping[str, float],
        *,
        train: Iterable[str] = (),
        losses: Iterable[str] | Callable[[str], bool] = (),
        charts: Iterable[str] = (),
        postfix: Mapping[str, str] | None = None,
    ) -> None:
        """Log an update's ``metrics`` (rank-averaged, un-prefixed) as ``train/<name>``, ``losses/<name>`` and
        ``charts/<name>`` (the names listed that are present; ``losses`` may be a predicate), with
        ``perf/seconds_per_update``, ``charts/updates`` and ``charts/world_size``, at the samples seen.
        ``postfix`` maps progress-bar labels to metric names (the held-out pass rate is added when known)."""
        keep = losses if callable(losses) else set(losses).__contains__
        record = {**{f"train/{k}": metrics[k] for k in train if k in metrics},
                  **{f"losses/{k}": v for k, v in metrics.items() if keep(k)},
                  **{f"charts/{k}": metrics[k] for k in charts if k in metrics},
                  "perf/seconds_per_update": time.perf_counter() - self._t0, "charts/updates": self.update,
                  "charts/world_size": distributed.world_size(), **self.model_calls()}
        self.tracker.log(record, self.samples_seen)
        if distributed.is_main():  # for a job that runs this one beside others (compare.py's lanes)
            write_progress(self.cfg.run_dir, stage=self.name, done=self.update, total=self.cfg.total_updates,
                           heldout_pass_rate=self.last_eval.get(BAR_EVAL_METRIC))
        if self.bar is not None:
            shown = {label: f"{metrics[k]:.4g}" for label, k in (postfix or {}).items() if k in metrics}
            if BAR_EVAL_METRIC in self.last_eval:
                shown["heldout_pass"] = f"{self.last_eval[BAR_EVAL_METRIC]:.3f}"
            self.bar.set_postfix(**shown)

    def model_calls(self) -> dict[str, int]:
        """Base-model calls of the run so far, summed over resumes and ranks (:mod:`fluxguide.backbones.calls`, in
        forward-equivalents per image): ``perf/model_calls`` in the updates, ``perf/eval_model_calls`` in the
        held-out evaluations."""
        ranks = distributed.world_size()  # every rank does the same work on its own batch
        return {f"perf/{key}": int(self.state.get(key, 0)) + ranks * (MODEL_CALLS.cost(phase) - self._calls_at_start[phase])
                for key, phase in (("model_calls", "train"), ("eval_model_calls", "eval"))}

    # ----------------------------------------------------------------------------------------- files
    def save_checkpoint(self, *, eval_pending: bool = False) -> Path:
        """Write the checkpoint of the updates done (atomically; rank 0 only). ``eval_pending``: an evaluation
        was due at this update and skipped (an interrupt); the resumed run does it first."""
        state = {self.count_key: self.samples_seen, "elapsed_seconds": self.elapsed(), "algorithm": self.name,
                 "backbone_fingerprint": self.fingerprint, "config": self.config, "last_eval": self.last_eval,
                 **{key.removeprefix("perf/"): n for key, n in self.model_calls().items()}, **self.extra_state}
        if eval_pending:
            state["eval_pending"] = True
        return save_checkpoint(self.cfg.run_dir, self.update, modules=self.modules, optimizers=self.optimizers,
                               generators=dict(self._save_generators()), state=state)

    def finish(self, policy: nn.Module, sync: Mapping[str, nn.Module] | None = None) -> dict[str, float]:
        """End the run: close the tracker, check that the ranks hold the same ``sync`` modules (default:
        ``{"policy": policy}``), save ``<run_dir>/guidance.safetensors`` and the curves plot (rank 0), print and
        return the last held-out evaluation."""
        from fluxguide.harness.curves import plot_curves
        from fluxguide.policies import save_guidance_model

        self.tracker.log(self.model_calls(), self.samples_seen)  # the totals, the final evaluation's included
        self.tracker.finish()
        for name, module in (sync or {"policy": policy}).items():  # data-parallel ranks must end in sync
            distributed.check_in_sync(module, name)
        if distributed.is_main():
            path = save_guidance_model(policy, self.cfg.run_dir / "guidance.safetensors")  # evaluate.py / main.py
            plot_curves(self.cfg.run_dir)
            print(f"saved the policy to {path}")
        if self.lock is not None:
            self.lock.release()
        distributed.cleanup()
        if self.last_eval:
            shown = {k: round(v, 4) for k, v in self.last_eval.items() if not math.isnan(v)}
            print(f"final held-out evaluation after {self.samples_seen} {self.unit}s: {shown}")
        return self.last_eval
