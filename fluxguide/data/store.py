"""The crash-safe dataset store: (observation, target correction) pairs on disk as memory-mapped TensorDicts.

A dataset folder is safe to append to while a crash can happen at any moment:

    dataset/
        manifest.json           the chunks that belong to the dataset, with every file's size and SHA-256, and
                                its own SHA-256 (written last)
        chunk-000000/           one appended batch of episodes (TensorDict.memmap_ layout, no pickle)
            episodes/           [E]: per-episode constants, stored once (txt, vec, final image, reward)
            transitions/        [N]: per-step img, pred, target, t, t_prev, step, episode (index into E)
            prompts.json        the E prompts
        chunk-000001/ ...

An append writes the chunk into a hidden temporary folder, renames it into place (atomic on one file
system) and only then rewrites the manifest (atomically, :func:`fluxguide.serialization.write_json_atomic`).
A crash mid-append leaves a temporary folder or a chunk the manifest does not list: readers ignore both and
the next append removes them, so a killed collection loses at most the chunk in flight. File sizes and SHA-256s
in the manifest catch truncated or altered files (a memory map of a truncated file would silently read zeros).

Loading concatenates the chunks into one dataset (global episode indices), and
:meth:`GuidanceDataset.replay_buffer` fills a TorchRL ``ReplayBuffer`` whose transform joins each sampled
transition with its episode's ``txt`` / ``vec``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer

from fluxguide import keys
from fluxguide.data.chunk_files import (
    CHUNKS_BEFORE_SHA256,
    DatasetError,
    DatasetNotFoundError,
    check_chunk_files,
    check_finite,
    check_manifest_digest,
    check_memmap_folder,
    chunk_record,
    fsync_tree,
    signed,
    tensor_spec,
)
from fluxguide.data.episodes import EPISODE, EPISODE_CONSTANTS, EpisodeChunk
from fluxguide.locking import LOCK_FILE
from fluxguide.serialization import open_for_writing, refuse_links, write_json_atomic

MANIFEST = "manifest.json"
#: Chunks already checked for non-finite values in this process, by dataset folder (each is checked once, not
#: again at every reload after an append). Chunks are immutable once listed in the manifest.
_FINITE_CHECKED: set[tuple[Path, int]] = set()
FORMAT = "fluxguide.guidance_dataset"
#: 2: SHA-256s of every chunk file and of the manifest itself. A version 1 dataset loads with its size checks and
#: becomes version 2 at its next append (its chunks so far, :data:`CHUNKS_BEFORE_SHA256`, keep those checks).
VERSION = 2


def check_collection_settings(dataset: GuidanceDataset, seed: int, settings: dict[str, Any]) -> None:
    """Refuse resuming a collection of ``seed`` under settings that change what its chunks mean.

    A chunk is identified by ``(seed, batch_index)``; which prompts a batch index covers depends on
    ``settings`` (the batch size, the prompt set), so a rerun with other settings would skip batches it did
    not collect and keep the wrong episodes. Chunks that predate these settings are not checked.
    """
    for meta in dataset.chunk_metadata:
        if meta.get("seed") != seed:
            continue
        diffs = [f"{flag}: stored {meta[key]!r}, given {value!r}" for key, value in settings.items()
                 for flag in [f"--{key.replace('_', '-')}"] if key in meta and meta[key] != value]
        if diffs:
            raise DatasetError(
                f"the dataset at {dataset.path} was collected with seed {seed} under other settings ("
                + "; ".join(diffs) + "): rerun with the stored settings to resume it, or collect into a new "
                "folder (or, to add data, under another --seed)"
            )


@dataclass
class _Chunk:
    name: str
    episodes: TensorDict
    transitions: TensorDict
    prompts: list[str]
    metadata: dict[str, Any]


SEED_ALIASES: dict[str, str] = {"timestep": keys.T, "step_idx": keys.STEP}
"""The seed's batch names (``batch['timestep']``, ``batch['step_idx']``) for the observation keys."""


class JoinEpisodeConstants(nn.Module):
    """Replay-buffer transform: add each sampled transition's per-episode ``txt`` and ``vec``.

    Per-episode constants are stored once per episode; this gathers them by the transitions' ``episode``
    index when a batch is sampled, so a batch is a complete observation for a guidance model. It also adds
    the seed's names ``timestep`` and ``step_idx`` (copies of ``t`` and ``step``), so the seed's loop
    ``trainer.train_step(img=batch['img'], ..., timestep=batch['timestep'], step_idx=batch['step_idx'],
    target_correction=batch['target'])`` runs on sampled batches unchanged.
    """

    def __init__(self, episodes: TensorDict, keys_to_join: Sequence[str] = EPISODE_CONSTANTS) -> None:
        super().__init__()
        self.episodes = episodes.select(*keys_to_join)

    def forward(self, batch: TensorDict) -> TensorDict:
        idx = batch[EPISODE].to(self.episodes.device)
        joined = self.episodes[idx]
        for key, value in joined.items():
            batch.set(key, value.to(batch.device) if batch.device is not None else value)
        for alias, key in SEED_ALIASES.items():
            batch.set(alias, batch[key])
        return batch


class GuidanceDataset:
    """A folder of (observation, target correction) pairs, appendable chunk by chunk and loaded as one.

    Open an existing dataset with ``GuidanceDataset(path)``; create (or open) one for writing with
    :meth:`create`. A :class:`GuidanceDataset` is a snapshot: appending through it refreshes it; appends
    by another process are seen after :meth:`reload`.

    Args:
        path: the dataset folder.
        verify: check every chunk file's size and SHA-256 against the manifest (catches truncated or altered
            files; reads the whole dataset once per load, seconds per GB); ``False`` skips it.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self._verified: set[str] = set()  # manifest entries of the chunks checked by this object (immutable)
        self.reload()

    # ---- creation and appends

    @classmethod
    def create(cls, path: str | Path, metadata: dict[str, Any] | None = None, exist_ok: bool = True) -> GuidanceDataset:
        """Create an empty dataset at ``path`` (or open the existing one if ``exist_ok``).

        Args:
            path: the dataset folder.
            metadata: JSON-serialisable facts about the dataset (e.g. the target strategy), kept in the
                manifest. For an existing dataset they must agree with the stored ones.
            exist_ok: open an existing dataset instead of raising.
        """
        path = Path(path)
        manifest = path / MANIFEST
        if manifest.is_file():
            if not exist_ok:
                raise FileExistsError(f"a guidance dataset already exists at {path}; pass exist_ok=True to append")
            dataset = cls(path)
            stored = dataset.metadata
            clash = {k: (stored[k], v) for k, v in (metadata or {}).items() if k in stored and stored[k] != v}
            if clash:
                shown = "; ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in clash.items())
                raise DatasetError(
                    f"dataset {path} was collected with different settings ({shown}) (stored, given); these "
                    f"change what its chunks mean: append to a new folder or use the stored settings"
                )
            return dataset
        if path.exists() and any(p.name not in (".lock", LOCK_FILE) for p in path.iterdir()):
            raise DatasetError(
                f"{path} exists and is not an empty folder or a guidance dataset (no {MANIFEST}): choose "
                "another path"
            )
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(signed({"format": FORMAT, "version": VERSION, "metadata": dict(metadata or {}),
                                  "spec": None, "chunks": [], CHUNKS_BEFORE_SHA256: 0}), manifest)
        return cls(path)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer at a time (an advisory lock on ``.lock`` in the folder)."""
        with open_for_writing(self.path / ".lock", "a") as f:  # never through a planted link
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def append(self, chunk: EpisodeChunk) -> str:
        """Append ``chunk`` atomically; returns the new chunk's folder name.

        Either the whole chunk becomes part of the dataset or (after a crash at any point) none of it does.
        """
        if chunk.num_episodes == 0:
            raise ValueError("cannot append an empty chunk (0 episodes)")
        with self._lock():
            manifest = self._read_manifest()
            spec = {"episodes": tensor_spec(chunk.episodes), "transitions": tensor_spec(chunk.transitions)}
            if manifest["spec"] is not None and manifest["spec"] != spec:
                raise DatasetError(self._spec_mismatch(manifest["spec"], spec))
            self._remove_stale(manifest)
            if manifest["version"] < VERSION:  # written before SHA-256s: its chunks so far keep their size checks
                manifest.update({"version": VERSION, CHUNKS_BEFORE_SHA256: len(manifest["chunks"])})
            name = f"chunk-{len(manifest['chunks']):06d}"
            tmp = self.path / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                chunk.episodes.detach().cpu().memmap_(prefix=tmp / "episodes")
                chunk.transitions.detach().cpu().memmap_(prefix=tmp / "transitions")
                (tmp / "prompts.json").write_text(json.dumps(chunk.prompts))
                fsync_tree(tmp)
                record = chunk_record(tmp)  # every file's size and SHA-256
                os.rename(tmp, self.path / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            manifest["spec"] = spec
            manifest["chunks"].append({
                "name": name,
                "num_episodes": chunk.num_episodes,
                "num_transitions": chunk.num_transitions,
                **record,
                "metadata": chunk.metadata,
            })
            write_json_atomic(signed(manifest), self.path / MANIFEST)
            self._verified.add(json.dumps(manifest["chunks"][-1], sort_keys=True))  # hashed from disk just now
        self.reload()
        return name

    def _remove_stale(self, manifest: dict[str, Any]) -> None:
        """Delete what crashed appends left behind (temporary folders, chunks the manifest does not list)."""
        listed = {c["name"] for c in manifest["chunks"]}
        for p in self.path.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("chunk-") and p.name not in listed)):
                refuse_links(p)  # a planted link: refused, not deleted through
                shutil.rmtree(p)

    @staticmethod
    def _spec_mismatch(stored: dict[str, Any], given: dict[str, Any]) -> str:
        def show(entry: dict[str, Any] | None) -> str:
            return "absent" if entry is None else f"{tuple(entry['shape'])} {entry['dtype']}"

        diffs = []
        for part in ("episodes", "transitions"):
            for k in sorted(set(stored[part]) | set(given[part])):
                a, b = stored[part].get(k), given[part].get(k)
                if a != b:
                    diffs.append(f"{part}/{k}: dataset {show(a)}, chunk {show(b)}")
        return (
            "the chunk does not match the dataset's shapes (" + "; ".join(diffs) + "): collect with the same "
            "backbone, text encoder and number of steps, or write to a new dataset folder"
        )

    # ---- reading

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not self.path.is_dir():
            raise DatasetNotFoundError(
                f"no guidance dataset at {self.path}: the folder does not exist (collect one with "
                "experiments/collect_data.py or GuidanceDataCollector.collect_to)"
            )
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{self.path} is not a guidance dataset: {MANIFEST} is missing (it is written when the dataset "
                "is created; collect into this folder with experiments/collect_data.py)"
            )
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is corrupt ({e}); the dataset at {self.path} cannot be read") from e
        manifest = manifest if isinstance(manifest, dict) else {}
        if manifest.get("format") != FORMAT or manifest.get("version") not in range(1, VERSION + 1):
            raise DatasetError(
                f"{path} is not a {FORMAT} manifest of version 1 to {VERSION} (format={manifest.get('format')!r}, "
                f"version={manifest.get('version')!r}; a newer version needs a newer fluxguide)"
            )
        check_manifest_digest(manifest, path)
        return manifest

    def reload(self) -> None:
        """Re-read the manifest and the chunks it lists (ignoring any left by a crashed append)."""
        manifest = self._read_manifest()
        self.manifest = manifest
        chunks = []
        hashed_from = manifest.get(CHUNKS_BEFORE_SHA256, 0) if manifest["version"] >= 2 else len(manifest["chunks"])
        for i, entry in enumerate(manifest["chunks"]):
            folder = self.path / entry["name"]
            for part in ("episodes", "transitions"):  # tensors only: nothing in a dataset is unpickled
                check_memmap_folder(folder / part)
            if self.verify and json.dumps(entry, sort_keys=True) not in self._verified:
                check_chunk_files(folder, entry, hashed=i >= hashed_from)
                self._verified.add(json.dumps(entry, sort_keys=True))
            try:
                episodes = TensorDict.load_memmap(folder / "episodes", allow_pickle=False)
                transitions = TensorDict.load_memmap(folder / "transitions", allow_pickle=False)
                prompts = json.loads((folder / "prompts.json").read_text())
            except (FileNotFoundError, KeyError, json.JSONDecodeError, RuntimeError, ValueError) as e:
                raise DatasetError(f"cannot read chunk {folder} of the dataset at {self.path}: {e}") from e
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
                raise DatasetError(f"{folder / 'prompts.json'} is not a list of prompts: the chunk is damaged")
            identity = (folder.resolve(), folder.stat().st_ino)
            if self.verify and identity not in _FINITE_CHECKED:
                check_finite(episodes, folder / "episodes")
                check_finite(transitions, folder / "transitions")
                _FINITE_CHECKED.add(identity)
            if episodes.batch_size[0] != entry["num_episodes"] or transitions.batch_size[0] != entry["num_transitions"]:
                raise DatasetError(f"chunk {folder} does not hold the episodes / transitions its manifest entry lists")
            chunks.append(_Chunk(entry["name"], episodes, transitions, prompts, entry.get("metadata", {})))
        self._chunks = chunks
        listed = {c["name"] for c in manifest["chunks"]}
        stale = sorted(p.name for p in self.path.iterdir() if p.is_dir() and (
            p.name.startswith(".tmp-") or (p.name.startswith("chunk-") and p.name not in listed)))
        if stale:
            warnings.warn(
                f"ignoring {stale} in {self.path}: left by an interrupted append (the next append removes them)",
                stacklevel=2,
            )
        counts = [c.transitions.batch_size[0] for c in chunks]
        self._transition_offsets = torch.tensor([0, *counts]).cumsum(0)
        ep_counts = [c.episodes.batch_size[0] for c in chunks]
        self._episode_offsets = torch.tensor([0, *ep_counts]).cumsum(0)
        self._episodes: TensorDict | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.manifest.get("metadata", {}))

    @property
    def chunk_metadata(self) -> list[dict[str, Any]]:
        """The metadata of every chunk, in order."""
        return [dict(c.metadata) for c in self._chunks]

    @property
    def spec(self) -> dict[str, Any] | None:
        """Per-item shapes and dtypes of the episode and transition entries (``None`` while empty)."""
        return self.manifest["spec"]

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def num_episodes(self) -> int:
        return int(self._episode_offsets[-1])

    @property
    def num_transitions(self) -> int:
        return int(self._transition_offsets[-1])

    def __len__(self) -> int:
        return self.num_transitions

    @property
    def prompts(self) -> list[str]:
        return [p for c in self._chunks for p in c.prompts]

    @property
    def episodes(self) -> TensorDict:
        """All episodes ``[E]`` (in memory; per-episode entries are small)."""
        if self._episodes is None:
            self._require_nonempty()
            self._episodes = torch.cat([c.episodes.to_tensordict() for c in self._chunks])
        return self._episodes

    def _require_nonempty(self) -> None:
        if not self._chunks:
            raise DatasetError(f"the dataset at {self.path} holds no episodes yet: collect some first")

    def transitions(self) -> TensorDict:
        """All transitions ``[N]`` in memory, with global episode indices (for small datasets)."""
        return self[torch.arange(self.num_transitions)]

    def __getitem__(self, index: torch.Tensor | Sequence[int] | slice) -> TensorDict:
        """Transitions at ``index`` (global), joined with their episodes' ``txt`` and ``vec``."""
        self._require_nonempty()
        if isinstance(index, slice):
            index = torch.arange(self.num_transitions)[index]
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        n = self.num_transitions
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"transition index out of range for a dataset of {n} transitions")
        index = index % n
        which = torch.searchsorted(self._transition_offsets, index, right=True) - 1
        parts, order = [], []
        for c in which.unique().tolist():
            sel = (which == c).nonzero().squeeze(1)
            local = index[sel] - self._transition_offsets[c]
            part = self._chunks[c].transitions[local].to_tensordict()
            part[EPISODE] = part[EPISODE] + self._episode_offsets[c]
            parts.append(part)
            order.append(sel)
        batch = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return JoinEpisodeConstants(self.episodes)(batch)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TensorDict:
        """A uniformly random batch of transitions (with replacement), joined with ``txt`` / ``vec``."""
        self._require_nonempty()
        return self[torch.randint(self.num_transitions, (batch_size,), generator=generator)]

    def replay_buffer(
        self,
        batch_size: int,
        *,
        storage: Literal["memory", "memmap"] = "memory",
        scratch_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> ReplayBuffer:
        """A TorchRL ``ReplayBuffer`` holding every transition; sampled batches carry ``txt`` and ``vec``.

        Args:
            batch_size: the replay buffer's sample size.
            storage: ``"memory"`` (``LazyTensorStorage`` on ``device``) or ``"memmap"``
                (``LazyMemmapStorage`` in ``scratch_dir``, for datasets larger than memory).
            scratch_dir: where a memmap storage lives (a temporary folder if ``None``).
            device: the storage device.
            generator: seeds the sampler.
        """
        self._require_nonempty()
        n = self.num_transitions
        if storage == "memory":
            store = LazyTensorStorage(n, device=device)
        elif storage == "memmap":
            store = LazyMemmapStorage(n, scratch_dir=scratch_dir, device=device)
        else:
            raise ValueError(f"storage must be 'memory' or 'memmap', got {storage!r}")
        rb = ReplayBuffer(
            storage=store,
            batch_size=batch_size,
            transform=JoinEpisodeConstants(self.episodes.to(device)),
            generator=generator,
        )
        for c, chunk in enumerate(self._chunks):  # chunk by chunk: never the whole dataset in memory twice
            part = chunk.transitions.exclude(EPISODE)
            part.set(EPISODE, chunk.transitions[EPISODE] + self._episode_offsets[c])
            rb.extend(part)
        return rb


def load_guidance_dataset(path: str | Path, verify: bool = True) -> GuidanceDataset:
    """Open the dataset folder ``path`` (all its appended chunks as one dataset)."""
    return GuidanceDataset(path, verify=verify)
