"""Patch sampling with nnU-Net's foreground oversampling, served to Lightning as whole batches.

nnU-Net trains on patches, not whole cases: a batch draws `batch_size` cases with replacement and crops one
patch from each. The last `oversample_foreground_percent` of every batch is centred on a random voxel of a
random foreground label, otherwise sparse structures would hardly ever be seen (nnU-Net's
`nnUNetDataLoader`). Preprocessing writes, per case, `<case>_data.npy` (C, Z, Y, X) float32,
`<case>_seg.npy` (1, Z, Y, X) int16 with the original label values (-1 outside the nonzero mask),
`<case>_fg.npz` with sampled foreground coordinates under `class_<value>`, and last `<case>.json`, the
marker that the case is complete. Arrays are memory-mapped so that a worker reads only its patch.

A DataLoader worker returns whole batches (`batch_size=None`); augmentation runs later, on the training
device, and crops the larger input patch to the network's. Every worker draws from its own generator,
seeded by (seed, stream, rank, epoch, worker), so runs are reproducible and every epoch differs. The epoch
lives in shared memory because persistent workers keep the dataset copy they were started with:
`SegmentationDataModule.set_epoch(epoch)` must be called before each training epoch starts, which
`viseg.training.callbacks.EpochSeeder` does in `on_train_epoch_start` (Lightning creates the epoch's iterator after
that hook; epoch 0 and a resumed epoch are set by `train_dataloader()` itself).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from viseg.config import LoaderConfig, SamplingConfig
from viseg.data.labels import LabelEncoding, Region
from viseg.errors import ConfigError, DatasetError
from viseg.io.layout import cached_case_files
from viseg.preprocessing.preprocess import load_arrays
from viseg.preprocessing.previous_stage import load_previous
from viseg.training.distributed import rank_batch

log = logging.getLogger(__name__)
RERUN_FIX = "re-run preprocessing for the dataset; cases without their marker were interrupted or never written"


@dataclass(frozen=True)
class _Case:
    data: np.ndarray  # (C, Z, Y, X) float32, memory-mapped
    seg: np.ndarray  # (1, Z, Y, X) int16, memory-mapped
    # label (or region) -> (N, 4) coordinates (channel, z, y, x); only non-empty ones
    foreground: dict[Region, np.ndarray]
    previous: np.ndarray | None = None  # a cascade's (Z, Y, X) previous-stage labels, memory-mapped


def _require_markers(folder: Path, case_ids: Sequence[str]) -> None:
    """Refuse every case whose completion marker is missing, all in one message."""
    missing = [case for case in case_ids if not (folder / cached_case_files(case).marker).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} case(s) in {folder} are not completely preprocessed "
                           f"(no <case>.json marker): {', '.join(missing)}", fix=RERUN_FIX)


def _load_case(folder: Path, case_id: str, labels: Sequence[Region], previous_dir: Path | None = None) -> _Case:
    try:
        data, seg, found = load_arrays(folder, case_id)
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"cannot read the preprocessed arrays of case {case_id} in {folder}: {exc}",
                           fix=RERUN_FIX) from exc
    if data.ndim != 4 or seg.shape != (1, *data.shape[1:]):
        raise DatasetError(f"case {case_id} in {folder}: data {data.shape} and seg {seg.shape} must be "
                           "(C, Z, Y, X) and (1, Z, Y, X)", fix=RERUN_FIX)
    foreground = {value: found[value].reshape(-1, 4) for value in labels if value in found and found[value].size}
    previous = load_previous(previous_dir, case_id, data.shape[1:]) if previous_dir is not None else None
    return _Case(data, seg, foreground, previous)


def _check_sampler_args(patch_size: Sequence[int], network_patch_size: Sequence[int], batch_size: int,
                        oversample: float, conv_dim: int) -> None:
    if conv_dim not in (2, 3):
        raise ConfigError(f"conv_dim must be 2 or 3, got {conv_dim}")
    if len(patch_size) != conv_dim or len(network_patch_size) != conv_dim:
        raise ConfigError(f"patch sizes {list(patch_size)} / {list(network_patch_size)} need {conv_dim} axes "
                          f"for a {conv_dim}D network")
    if any(n < 1 or n > p for p, n in zip(patch_size, network_patch_size)):
        raise ConfigError(f"network patch {list(network_patch_size)} must be positive and fit in the sampled "
                          f"patch {list(patch_size)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if not 0.0 <= oversample <= 1.0:
        raise ConfigError(f"oversample_foreground_percent must lie in [0, 1], got {oversample}")


class PatchSampler:
    """Draws batches of patches exactly like nnU-Net's data loader, from one preprocessed folder.

    `patch_size` is the size sampled (augmentation may crop it later); `network_patch_size` (default: the
    same) is what the network sees. Their difference is nnU-Net's `need_to_pad`: random patches may reach
    that far past the image so that, after the central crop, the network's patch still covers the borders.
    For `conv_dim == 2` the patch is one slice (axis 0) of the 3D volume and the batch is (B, C, H, W).
    Labels come out as `LabelEncoding` codes; `ignore_label` is dataset.json's `ignore` value, if any.
    """

    def __init__(self, folder: Path, case_ids: Sequence[str], patch_size: Sequence[int], batch_size: int,
                 foreground_labels: Sequence[int], oversample_foreground_percent: float, conv_dim: int,
                 network_patch_size: Sequence[int] | None = None, ignore_label: int | None = None,
                 oversample_keys: Sequence[Region] | None = None, previous_dir: Path | None = None) -> None:
        """`oversample_keys`: what forced-foreground patches centre on, the foreground labels by default;
        a region plan's regions (preprocessing samples their locations, as nnU-Net's class_locations).
        `previous_dir`: a cascade's previous-stage labels (`viseg.preprocessing.previous_stage`), cropped with
        each patch into a second seg channel."""
        network = tuple(patch_size) if network_patch_size is None else tuple(network_patch_size)
        self.labels = LabelEncoding(tuple(int(v) for v in foreground_labels), ignore_label)
        _check_sampler_args(patch_size, network, batch_size, oversample_foreground_percent, conv_dim)
        if not case_ids:
            raise ConfigError(f"no cases to sample patches from in {folder}")
        self.folder, self.case_ids = Path(folder), list(case_ids)
        self.previous_dir = Path(previous_dir) if previous_dir is not None else None
        _require_markers(self.folder, self.case_ids)
        self.batch_size, self.conv_dim = batch_size, conv_dim
        self.global_batch_size, self.global_oversample = batch_size, oversample_foreground_percent
        self.oversample_keys = tuple(self.labels.foreground_labels if oversample_keys is None else oversample_keys)
        lead = (1,) if conv_dim == 2 else ()  # 2D: a one-slice 3D patch; the singleton axis is dropped at the end
        self.patch = np.array((*lead, *patch_size), dtype=np.int64)
        self.need_to_pad = self.patch - np.array((*lead, *network), dtype=np.int64)
        # nnU-Net's rule, Python's round included: sample i is forced to foreground from this index on
        self.first_forced = round(batch_size * (1 - oversample_foreground_percent))
        self._cache: dict[str, _Case] = {}
        self._channels: int | None = None

    def share_for_rank(self, rank: int, world_size: int) -> None:
        """Draw this DDP rank's share of the planned batch, oversampling its share of the forced samples
        (distributed.rank_batch); world_size 1 restores the whole batch."""
        batch, oversample = rank_batch(self.global_batch_size, self.global_oversample, rank, world_size)
        self.batch_size = batch
        self.first_forced = round(batch * (1 - oversample))

    def __getstate__(self) -> dict[str, Any]:
        # a pickled memory map would travel as a full copy: spawned workers open their own maps instead
        return {**self.__dict__, "_cache": {}}

    def sample_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """data (B, C, *patch) float32 and seg (B, 1, *patch) int64 in `LabelEncoding` codes: 0..K, the
        ignore code, and OUTSIDE outside the nonzero mask and where the patch is padded (nnU-Net pads the
        seg with -1), which augmentation turns into background. A cascade's seg has a second channel, the
        previous stage's labels in the same codes."""
        cases = [self._case(self.case_ids[i]) for i in rng.integers(len(self.case_ids), size=self.batch_size)]
        data = np.zeros((self.batch_size, self._channels, *self.patch), dtype=np.float32)
        seg_channels = 1 if self.previous_dir is None else 2
        seg = np.full((self.batch_size, seg_channels, *self.patch), LabelEncoding.OUTSIDE, dtype=np.int64)
        for i, case in enumerate(cases):
            lower = self._lower_corner(case, i >= self.first_forced, rng)
            self._crop_into(case, lower, data[i], seg[i])
        if self.conv_dim == 2:
            return data[:, :, 0], seg[:, :, 0]
        return data, seg

    def _case(self, case_id: str) -> _Case:
        case = self._cache.get(case_id)
        if case is None:
            case = _load_case(self.folder, case_id, self.oversample_keys, self.previous_dir)
            if self._channels is not None and case.data.shape[0] != self._channels:
                raise DatasetError(f"case {case_id} in {self.folder} has {case.data.shape[0]} channels, "
                                   f"other cases {self._channels}", fix=RERUN_FIX)
            self._channels = case.data.shape[0]
            self._cache[case_id] = case
        return case

    def _lower_corner(self, case: _Case, force_foreground: bool, rng: np.random.Generator) -> np.ndarray:
        """nnU-Net's get_bbox: the patch's first voxel, negative or past the end where it is padded."""
        shape = np.array(case.data.shape[1:], dtype=np.int64)
        # an image smaller than the patch is padded on both sides, enough to hold the whole patch
        need = np.maximum(self.need_to_pad, self.patch - shape)
        lower = -need // 2
        upper = shape + need // 2 + need % 2 - self.patch
        if force_foreground and case.foreground:
            labels = list(case.foreground)
            locations = case.foreground[labels[rng.integers(len(labels))]]
            voxel = locations[rng.integers(len(locations))][1:]  # drop the channel index
            # centred on the voxel; like nnU-Net, only the lower bound is enforced (the rest is padded)
            return np.maximum(lower, voxel - self.patch // 2)
        return rng.integers(lower, upper + 1)

    def _crop_into(self, case: _Case, lower: np.ndarray, data_out: np.ndarray, seg_out: np.ndarray) -> None:
        """Copy the part of the patch inside the image; the rest keeps its padding (data 0, seg OUTSIDE)."""
        source, target = [], []
        for start, size, extent in zip(lower.tolist(), self.patch.tolist(), case.data.shape[1:]):
            first = min(max(start, 0), extent)
            last = max(min(start + size, extent), first)
            source.append(slice(first, last))
            target.append(slice(first - start, last - start))
        data_out[(slice(None), *target)] = case.data[(slice(None), *source)]
        seg_out[(0, *target)] = self.labels.encode(case.seg[(0, *source)])
        if case.previous is not None:
            seg_out[(1, *target)] = self.labels.encode(case.previous[tuple(source)])


class TrainingBatches(IterableDataset):
    """`iterations` batches per epoch from a PatchSampler, shared out among the DataLoader's workers."""

    def __init__(self, sampler: PatchSampler, iterations: int, seed: int, stream: int = 0) -> None:
        super().__init__()
        if iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {iterations}")
        self.sampler, self.iterations = sampler, iterations
        self.seed, self.stream = seed, stream  # stream: training and validation draw unrelated patches
        self.rank = 0  # the DataModule sets the process rank, so that DDP ranks draw different patches
        # shared memory: persistent workers hold a copy of this object, but see writes to the value
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        # lets Lightning know the epoch length (progress, estimated_stepping_batches)
        return self.iterations

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        count = self.iterations // workers + (1 if worker < self.iterations % workers else 0)
        rng = np.random.default_rng([self.seed % 2**64, self.stream, self.rank, self.epoch, worker])
        for _ in range(count):
            data, seg = self.sampler.sample_batch(rng)
            yield torch.from_numpy(data), torch.from_numpy(seg)


class SegmentationDataModule(L.LightningDataModule):
    """Training and validation batches from one preprocessed folder and one cross-validation split.

    Validation samples like training (nnU-Net validates on oversampled patches too) from its own cases and
    its own stream, with new patches every epoch as nnU-Net's validation loader draws them: a pseudo-Dice
    (and so the best checkpoint) resting on one fixed set of 50 patches would reward fitting those patches.
    Both streams are reproducible per (seed, epoch).
    """

    def __init__(self, folder: Path, train_ids: Sequence[str], val_ids: Sequence[str],
                 input_patch_size: Sequence[int], batch_size: int, foreground_labels: Sequence[int],
                 sampling: SamplingConfig, loader: LoaderConfig, iterations_per_epoch: int, val_iterations: int,
                 conv_dim: int, seed: int, network_patch_size: Sequence[int] | None = None,
                 ignore_label: int | None = None, oversample_keys: Sequence[Region] | None = None,
                 previous_dir: Path | None = None) -> None:
        super().__init__()
        self.loader_cfg = loader

        def sampler(case_ids: Sequence[str]) -> PatchSampler:
            return PatchSampler(Path(folder), case_ids, input_patch_size, batch_size, foreground_labels,
                                sampling.oversample_foreground_percent, conv_dim, network_patch_size, ignore_label,
                                oversample_keys, previous_dir)

        self.train_batches = TrainingBatches(sampler(train_ids), iterations_per_epoch, seed, stream=0)
        self.val_batches = TrainingBatches(sampler(val_ids), val_iterations, seed, stream=1)

    def set_epoch(self, epoch: int) -> None:
        """Call before each training epoch starts (viseg.training.callbacks.EpochSeeder does); the epoch's
        validation, which Lightning runs at its end, then draws that epoch's patches too."""
        self.train_batches.set_epoch(epoch)
        self.val_batches.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            # Lightning creates epoch 0's iterator (or a resumed epoch's) before on_train_epoch_start
            self.set_epoch(self.trainer.current_epoch)
        return self._loader(self.train_batches)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_batches)

    def _loader(self, batches: TrainingBatches) -> DataLoader:
        if self.trainer is not None:
            batches.rank = self.trainer.global_rank
            sampler, world = batches.sampler, self.trainer.world_size
            sampler.share_for_rank(self.trainer.global_rank, world)
            if world > 1:
                log.info("rank %d of %d: %d of the %d samples of each batch, %d of them forced to foreground",
                         self.trainer.global_rank, world, sampler.batch_size, sampler.global_batch_size,
                         sampler.batch_size - sampler.first_forced)
        workers = self.loader_cfg.num_workers
        return DataLoader(batches, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=self.loader_cfg.pin_memory and torch.cuda.is_available(),
                          prefetch_factor=self.loader_cfg.prefetch_factor if workers > 0 else None)
