"""Patch sampling and the data module, on real .npy folders written here in the preprocessing layout.

Most cases hold coordinate images: channel 0..2 hold z+1, y+1, x+1, so a patch tells exactly where it was
cropped from (0 marks padding), and every sampled voxel can be checked against the original labels.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from viseg.config import LoaderConfig, SamplingConfig
from viseg.data.labels import LabelEncoding
from viseg.errors import DatasetError
from viseg.training.loader import PatchSampler, SegmentationDataModule, TrainingBatches

OUTSIDE = LabelEncoding.OUTSIDE

SHAPE = (12, 24, 24)


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray, marker: bool = True) -> None:
    """One case exactly as preprocessing writes it; the marker json comes last."""
    np.save(folder / f"{case_id}_data.npy", data.astype(np.float32))
    np.save(folder / f"{case_id}_seg.npy", seg.astype(np.int16)[None])
    locations = {f"class_{v}": np.argwhere(seg[None] == v) for v in np.unique(seg) if v > 0}
    np.savez(folder / f"{case_id}_fg.npz", **locations)
    if marker:
        (folder / f"{case_id}.json").write_text("{}")


def coordinates(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(1, s + 1) for s in shape], indexing="ij")).astype(np.float32)


def labels(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Background, -1 outside a 'body', a large label 1, a label 2 and a sparse 2x2x2 label 3."""
    seg = np.zeros(shape, dtype=np.int16)
    seg[:, :2] = -1
    z, y, x = (int(rng.integers(2, s - 8)) for s in shape)
    seg[z:z + 6, y:y + 6, x:x + 6] = 1
    seg[z + 1:z + 3, y + 1:y + 3, x + 4:x + 6] = 2
    seg[shape[0] // 2:shape[0] // 2 + 2, 17:19, 5:7] = 3
    return seg


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        write_case(tmp_path, f"case_{i}", coordinates(SHAPE), labels(SHAPE, rng))
    return tmp_path


def ids(n: int = 4) -> list[str]:
    return [f"case_{i}" for i in range(n)]


def sampler(folder: Path, patch=(8, 12, 12), batch_size=2, fg=(1, 2, 3), oversample=0.33, conv_dim=3,
            **kwargs) -> PatchSampler:
    return PatchSampler(folder, kwargs.pop("case_ids", ids()), patch, batch_size, list(fg), oversample,
                        conv_dim, **kwargs)


def origin_labels(folder: Path, case_id: str, patch: np.ndarray) -> np.ndarray:
    """The original label under every voxel of a coordinate patch (C, ...); -1 where padded."""
    seg = np.load(folder / f"{case_id}_seg.npy")[0]
    index = patch[:3].astype(np.int64) - 1
    inside = (index >= 0).all(axis=0)
    out = np.full(patch.shape[1:], -1, dtype=np.int64)
    out[inside] = seg[tuple(index[:, inside])]
    return out


def test_3d_batch_shapes_and_types(folder):
    data, seg = sampler(folder, batch_size=3).sample_batch(np.random.default_rng(0))
    assert data.shape == (3, 3, 8, 12, 12) and data.dtype == np.float32
    assert seg.shape == (3, 1, 8, 12, 12) and seg.dtype == np.int64


def test_2d_patches_are_single_slices(folder):
    data, seg = sampler(folder, patch=(12, 16), batch_size=4, conv_dim=2).sample_batch(np.random.default_rng(0))
    assert data.shape == (4, 3, 12, 16) and seg.shape == (4, 1, 12, 16)
    assert data.flags.c_contiguous
    for patch in data:
        assert len(np.unique(patch[0])) == 1  # one z for the whole patch


def test_patch_larger_than_the_image_is_padded_with_zeros_and_outside(tmp_path):
    shape = (4, 6, 6)
    seg = np.zeros(shape, dtype=np.int16)
    seg[1:3, 2:4, 2:4] = 3
    write_case(tmp_path, "small", coordinates(shape), seg)
    data, out = sampler(tmp_path, patch=(8, 10, 10), fg=[3], case_ids=["small"]).sample_batch(
        np.random.default_rng(0))
    for sample in range(2):
        # padding (8-4, 10-6, 10-6) is split evenly: the image sits in the middle of the patch
        np.testing.assert_array_equal(data[sample, :, 2:6, 2:8, 2:8], coordinates(shape))
        assert data[sample].sum() == coordinates(shape).sum()
        assert (out[sample] == 1).sum() == (seg == 3).sum() and (out[sample, 0, 3:5, 4:6, 4:6] == 1).all()
        # the seg is padded like nnU-Net's (-1): augmentation zeroes masked channels there, then makes it 0
        assert (out[sample, 0, 2:6, 2:8, 2:8] >= 0).all() and (out[sample] == OUTSIDE).sum() == 8 * 10 * 10 - 4 * 6 * 6


def test_random_patches_reach_past_the_border_by_half_the_crop_margin(folder):
    # sampled 16 wide for an 8 wide network patch: nnU-Net lets the corner range over [-4, 24 - 16 + 4]
    patches = sampler(folder, patch=(8, 16, 16), network_patch_size=(8, 8, 8), oversample=0.0)
    rng = np.random.default_rng(0)
    corners = []
    for _ in range(200):
        data, _ = patches.sample_batch(rng)
        for sample in data:
            x = sample[2, sample.shape[1] // 2, sample.shape[2] // 2]
            first = int(np.flatnonzero(x)[0])
            corners.append(int(x[first]) - 1 - first)
    assert min(corners) == -4 and max(corners) == 12


@pytest.mark.parametrize("percent", [1.0, 0.0])
def test_oversampling_forces_foreground(folder, percent):
    patches = sampler(folder, fg=[3], oversample=percent)
    rng = np.random.default_rng(1)
    hits = [bool((seg > 0).any()) for _ in range(150) for seg in patches.sample_batch(rng)[1]]
    if percent == 1.0:
        assert all(hits)
    else:  # a random 8x12x12 patch covers the 2x2x2 label in roughly a fifth of the draws
        assert 0.0 < np.mean(hits) < 0.5


def test_the_last_samples_of_a_batch_are_the_forced_ones(folder):
    patches = sampler(folder, fg=[3], batch_size=2, oversample=0.33)  # round(2 * 0.67) = 1: sample 1 forced
    rng = np.random.default_rng(2)
    batches = [patches.sample_batch(rng)[1] for _ in range(100)]
    assert all((seg[1] > 0).any() for seg in batches)
    assert np.mean([(seg[0] > 0).any() for seg in batches]) < 0.5


def test_forced_sampling_falls_back_to_random_patches_without_foreground(tmp_path):
    write_case(tmp_path, "empty", coordinates(SHAPE), np.zeros(SHAPE, dtype=np.int16))
    data, seg = sampler(tmp_path, fg=[3], oversample=1.0, case_ids=["empty"]).sample_batch(np.random.default_rng(0))
    assert (data[:, 0] > 0).all() and not (seg > 0).any()


@pytest.mark.parametrize("fg", [[3], [3, 1]])
def test_labels_are_remapped_in_the_given_order(folder, fg):
    patches = sampler(folder, fg=fg, oversample=0.5, batch_size=4, case_ids=["case_0"])
    rng = np.random.default_rng(3)
    seen: set[int] = set()
    for _ in range(20):
        data, seg = patches.sample_batch(rng)
        for sample, target in zip(data, seg):
            original = origin_labels(folder, "case_0", sample)
            expected = np.zeros_like(original)  # other labels become 0; -1 and padding stay OUTSIDE
            expected[original == -1] = OUTSIDE
            for k, value in enumerate(fg, start=1):
                expected[original == value] = k
            np.testing.assert_array_equal(target[0], expected)
            seen |= set(np.unique(target).tolist())
    assert seen == {OUTSIDE, *range(len(fg) + 1)}


def test_same_seed_same_batches_and_epochs_differ(folder):
    first = TrainingBatches(sampler(folder), iterations=3, seed=7)
    second = TrainingBatches(sampler(folder), iterations=3, seed=7)
    epoch0 = [d for d, _ in first]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, [d for d, _ in second]))
    first.set_epoch(1)
    epoch1 = [d for d, _ in first]
    assert not any(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    first.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, [d for d, _ in first]))


def datamodule(folder: Path, workers: int, iterations: int = 5, **kwargs) -> SegmentationDataModule:
    return SegmentationDataModule(folder, ids(3), ids(4)[3:], (8, 12, 12), 2, [1, 2, 3], SamplingConfig(),
                                  LoaderConfig(num_workers=workers), iterations, 2, 3, seed=0, **kwargs)


def keys(loader: DataLoader) -> list[bytes]:
    return [data.numpy().tobytes() for data, _ in loader]


def test_workers_share_the_epoch_and_persistent_workers_see_new_epochs(folder):
    module = datamodule(folder, workers=2)
    loader = module.train_dataloader()
    assert loader.persistent_workers and loader.batch_size is None and not loader.pin_memory
    epoch0 = keys(loader)
    assert len(epoch0) == 5 and len(set(epoch0)) == 5  # the two workers draw different patches
    module.set_epoch(1)
    epoch1 = keys(loader)
    assert len(epoch1) == 5 and not set(epoch0) & set(epoch1)
    module.set_epoch(0)
    assert keys(loader) == epoch0


def test_validation_draws_new_patches_every_epoch_reproducibly(folder):
    module = datamodule(folder, workers=0)
    loader = module.val_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers
    first = keys(loader)
    module.set_epoch(3)
    third = keys(loader)
    assert len(first) == len(third) == 2 and not set(first) & set(third)
    module.set_epoch(0)
    assert keys(loader) == first
    assert not set(first) & set(keys(module.train_dataloader()))  # validation has its own stream


def test_train_dataloader_takes_the_trainers_epoch_and_rank(folder):
    # epoch 0 and a resumed epoch get their iterator before on_train_epoch_start: the loader sets them itself
    module = datamodule(folder, workers=0)
    module.trainer = SimpleNamespace(current_epoch=3, global_rank=1, world_size=1)  # a resumed rank 1
    loader = module.train_dataloader()
    assert module.train_batches.epoch == 3 and module.train_batches.rank == 1
    resumed = keys(loader)
    module.train_batches.rank = 0
    assert not set(resumed) & set(keys(loader))  # ranks draw different patches


def test_a_ddp_rank_draws_its_share_of_the_planned_batch(folder):
    module = datamodule(folder, workers=0)
    module.trainer = SimpleNamespace(current_epoch=0, global_rank=1, world_size=2)
    data, seg = next(iter(module.train_dataloader()))
    sampler = module.train_batches.sampler  # rank 1's share (distributed.rank_batch): 1 of 2, the forced one
    assert data.shape[0] == seg.shape[0] == sampler.batch_size == 1 and sampler.global_batch_size == 2
    assert sampler.first_forced == 0
    module.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1)
    assert next(iter(module.train_dataloader()))[0].shape[0] == 2  # one process again: the whole batch


@pytest.mark.slow  # each spawned worker imports torch and lightning again (about 10 s on a small machine)
def test_spawned_workers_get_the_epoch_too(folder):
    # Python 3.14 starts workers with forkserver: the dataset is pickled, the shared epoch must survive that
    batches = datamodule(folder, workers=0).train_batches
    reference = keys(DataLoader(batches, batch_size=None, num_workers=2))
    loader = DataLoader(batches, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context="spawn")
    assert keys(loader) == reference
    batches.set_epoch(1)
    epoch1 = keys(loader)
    assert len(epoch1) == 5 and not set(reference) & set(epoch1)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_keys: dict[int, list[bytes]] = {}
        self.val_keys: dict[int, list[bytes]] = {}

    def training_step(self, batch, batch_idx):
        self.train_keys.setdefault(self.current_epoch, []).append(batch[0].numpy().tobytes())
        return (self.weight * batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.setdefault(self.current_epoch, []).append(batch[0].numpy().tobytes())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SetEpoch(L.Callback):
    """What the documented contract asks of the training loop (viseg.training.callbacks.EpochSeeder does this)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.datamodule.set_epoch(trainer.current_epoch)


def fit(folder: Path) -> _Recorder:
    module = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[_SetEpoch()])
    trainer.fit(module, datamodule=datamodule(folder, workers=2, iterations=4))
    return module


def test_lightning_fit_draws_new_patches_every_epoch_reproducibly(folder):
    first = fit(folder)
    assert [len(first.train_keys[e]) for e in (0, 1)] == [4, 4]
    assert not set(first.train_keys[0]) & set(first.train_keys[1])
    assert not set(first.val_keys[0]) & set(first.val_keys[1])
    again = fit(folder)
    assert again.train_keys == first.train_keys and again.val_keys == first.val_keys


def test_a_case_without_marker_is_refused_by_name(folder):
    (folder / "case_2.json").unlink()
    with pytest.raises(DatasetError, match="case_2"):
        sampler(folder)


def test_mismatched_arrays_are_reported_by_case(folder):
    np.save(folder / "case_1_seg.npy", np.zeros((1, 3, 3, 3), dtype=np.int16))
    with pytest.raises(DatasetError, match="case_1"):
        sampler(folder, case_ids=["case_1"]).sample_batch(np.random.default_rng(0))


def test_the_ignore_label_gets_the_code_after_the_classes(tmp_path):
    """dataset.json's ignore label (here 4) becomes K + 1, a code no class has, so the loss can skip it;
    labels not predicted become background and -1 stays OUTSIDE for augmentation."""
    seg = labels(SHAPE, np.random.default_rng(0))
    seg[: SHAPE[0] // 2, 10:] = 4
    write_case(tmp_path, "case_0", coordinates(SHAPE), seg)
    patches = sampler(tmp_path, fg=[3, 1], oversample=0.5, batch_size=4, case_ids=["case_0"], ignore_label=4)
    assert patches.labels.ignore_index == 3
    lookup = {-1: OUTSIDE, 0: 0, 1: 2, 2: 0, 3: 1, 4: 3}
    seen: set[int] = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        data, out = patches.sample_batch(rng)
        for sample, target in zip(data, out):
            original = origin_labels(tmp_path, "case_0", sample)
            np.testing.assert_array_equal(target[0], np.vectorize(lookup.get)(original))
            seen |= set(np.unique(target).tolist())
    assert seen == {OUTSIDE, 0, 1, 2, 3}
