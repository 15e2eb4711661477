"""Streaming: equal batch counts across ranks, no duplicates, eval coverage, epochs, corrupt samples."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from distseg.data.augment import AugmentConfig
from distseg.data.errors import DataError
from distseg.data.plan import SampleRef, plan_epoch, select_samples
from distseg.data.shard import shard_dataset
from distseg.data.stream import StreamConfig, build_loader
from distseg.data.synthetic import write_dataset

NO_STRONG = dict(jitter_prob=0.0, blur_prob=0.0, grayscale_prob=0.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """27 labelled images of varying size in 7 uneven shards (4 samples each, the last 3)."""
    root = tmp_path_factory.mktemp("stream")
    src = write_dataset(root / "src", 27, (20, 40), seed=0)
    shard_dataset(root / "out", images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                  split="1:0:0", shard_size=4)
    return root / "out"


def fake_samples(sizes: list[int]) -> list[list[SampleRef]]:
    return [[SampleRef(s, p, f"s{s}p{p}") for p in range(n)] for s, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes, batch", [([7, 3, 11, 1, 5], 4), ([3], 4), ([1, 1, 1, 1, 1, 2], 2)])
def test_plan_gives_equal_batches_and_disjoint_ranges(sizes, batch):
    samples = fake_samples(sizes)
    n = sum(sizes)
    for epoch in range(3):
        ranks = [plan_epoch(samples, rank=r, world_size=2, num_workers=2, batch_size=batch, seed=1,
                            epoch=epoch, train=True) for r in range(2)]
        batches = [sum(s.batches for s in slots) for slots in ranks]
        assert batches[0] == batches[1] >= 1
        refs = [ref for slots in ranks for s in slots for ref in s.refs]
        assert all(s.quota == s.batches * batch and len(s.refs) <= s.quota for sl in ranks for s in sl)
        if n >= 2 * 2:  # enough samples for every slot: ranges are disjoint and cover the split
            assert Counter(refs) == Counter(ref for shard in samples for ref in shard)
        padding = 2 * batches[0] * batch - n
        assert 0 <= padding < 2 * batch + 4


def test_eval_plan_reads_every_sample_once_without_padding():
    samples = fake_samples([7, 3, 11, 1, 5])
    refs = []
    for r in range(3):
        for slot in plan_epoch(samples, rank=r, world_size=3, num_workers=2, batch_size=4, seed=0, epoch=0,
                               train=False):
            refs += slot.refs
            assert slot.quota is None and slot.batches == -(-len(slot.refs) // 4)
    assert refs == [ref for shard in samples for ref in shard]


def test_sample_fraction_is_deterministic_and_nested():
    samples = fake_samples([500, 500])
    small = {r.key for s in select_samples([[r.key for r in x] for x in samples], 0.1, 3) for r in s}
    large = {r.key for s in select_samples([[r.key for r in x] for x in samples], 0.5, 3) for r in s}
    again = {r.key for s in select_samples([[r.key for r in x] for x in samples], 0.1, 3) for r in s}
    assert small == again and small < large
    assert 60 <= len(small) <= 140 and 420 <= len(large) <= 580


def test_two_ranks_two_workers_equal_batches_no_duplicates(shards):
    cfg = StreamConfig(batch_size=3, num_workers=2, shuffle_buffer=8, augment=AugmentConfig(crop_size=24), seed=4)
    keys, counts = [], []
    for rank in range(2):
        loader = build_loader(shards, "train", cfg, rank=rank, world_size=2, views=("weak", "strong"))
        loader.set_epoch(1)
        n = 0
        for batch in loader:
            n += 1
            assert batch.image.shape == (3, 3, 24, 24) and batch.image.dtype == torch.float32
            assert batch.mask.shape == (3, 24, 24) and batch.mask.dtype == torch.int64
            assert batch.image_strong.shape == batch.image.shape
            assert 0 <= batch.image.min() and batch.image.max() <= 1
            keys += batch.key
        counts.append(n)
        assert n == len(loader)
    assert counts[0] == counts[1] == 5  # ceil(ceil(27 / 2) / 3)
    repeats = Counter(keys)
    assert set(repeats) == {f"scene_{i:04d}" for i in range(27)}
    assert sum(c - 1 for c in repeats.values()) == 2 * 5 * 3 - 27  # only the minimal padding repeats


def test_epochs_reshuffle_deterministically_with_persistent_workers(shards):
    cfg = StreamConfig(batch_size=4, num_workers=2, augment=AugmentConfig(crop_size=16), seed=2)
    loader = build_loader(shards, "train", cfg)

    def order(epoch: int) -> list[str]:
        loader.set_epoch(epoch)  # must reach the persistent worker processes
        return [k for b in loader for k in b.key]

    first, second, again = order(3), order(4), order(3)
    assert first == again and first != second
    assert set(first) == set(second) and len(set(first)) == 27 and len(first) == 28


def test_eval_sees_each_sample_once_and_pads_to_batch_max(shards):
    cfg = StreamConfig(batch_size=4, num_workers=2)
    seen = []
    for rank in range(2):
        loader = build_loader(shards, "train", cfg, rank=rank, world_size=2, train=False)
        n = 0
        for batch in loader:
            n += 1
            seen += batch.key
            for i in range(len(batch.key)):
                pad = batch.mask[i] == 255
                assert (batch.image[i][:, pad] == 0).all()  # padding is 0 in the image
            assert batch.image.shape[-2:] == batch.mask.shape[-2:]
        assert n == len(loader)
    assert sorted(seen) == [f"scene_{i:04d}" for i in range(27)]


def test_strong_view_is_the_same_crop(shards):
    aug = AugmentConfig(crop_size=16, brightness=0.0, **NO_STRONG)
    batch = next(iter(build_loader(shards, "train", StreamConfig(batch_size=2, num_workers=0, augment=aug),
                                   views=("weak", "strong"))))
    assert torch.equal(batch.image, batch.image_strong)
    aug = AugmentConfig(crop_size=16, brightness=0.0, jitter_prob=0.0, blur_prob=0.0, grayscale_prob=1.0)
    batch = next(iter(build_loader(shards, "train", StreamConfig(batch_size=2, num_workers=0, augment=aug),
                                   views=("weak", "strong"))))
    gray = (batch.image * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(batch.image_strong[:, 0], gray)


def corrupt_one(shard_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shard folder where one sample's image bytes are garbage."""
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(shard_dir, out)
    path = out / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        victim = next(m.name for m, _ in members if m.name.endswith(".png") and ".mask" not in m.name)
        for m, data in members:
            data = b"not an image" if m.name == victim else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return out


def test_corrupt_sample_is_skipped_counted_and_replaced(shards, tmp_path):
    bad = corrupt_one(shards, tmp_path)
    cfg = StreamConfig(batch_size=3, num_workers=0, max_error_rate=0.1, augment=AugmentConfig(crop_size=16))
    loader = build_loader(bad, "train", cfg)
    with pytest.warns(UserWarning, match="skipping corrupt sample"):
        batches = list(loader)
    assert len(batches) == len(loader) == 9 and all(len(b.key) == 3 for b in batches)
    assert loader.errors == {"corrupt": 1, "seen": 27}
    strict = build_loader(bad, "train", StreamConfig(batch_size=3, num_workers=0, max_error_rate=0.0,
                                                     augment=AugmentConfig(crop_size=16)))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="above max_error_rate=0.0"):
        list(strict)


def test_bad_arguments(shards):
    with pytest.raises(DataError, match="split 'val' has no samples"):
        build_loader(shards, "val")
    with pytest.raises(ValueError, match="strong view"):
        build_loader(shards, "train", train=False, views=("weak", "strong"))
    with pytest.raises(ValueError, match="batch_size"):
        StreamConfig(batch_size=0)


def test_config_round_trips_through_dicts():
    from distseg.config import ConfigError, from_dict, to_dict

    cfg = StreamConfig(batch_size=4, augment=AugmentConfig(crop_size=64, scale_range=(0.75, 1.5)), sample_fraction=0.5)
    assert from_dict(StreamConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="sample_fraction"):
        from_dict(StreamConfig, {"sample_fraction": 0.0})


def test_unlabelled_split_with_sample_fraction(tmp_path):
    src = write_dataset(tmp_path / "src", 4, 24, seed=3, n_unlabeled=40)
    shard_dataset(tmp_path / "out", unlabeled=src / "unlabeled", shard_size=7)
    cfg = StreamConfig(batch_size=4, num_workers=0, augment=AugmentConfig(crop_size=16), sample_fraction=0.5)
    keys = []
    for batch in build_loader(tmp_path / "out", "unlabeled", cfg, views=("weak", "strong")):
        assert batch.mask is None and batch.image_strong is not None and batch.cutmix_box is None
        keys += batch.key
    chosen = {r.key for refs in build_loader(tmp_path / "out", "unlabeled", cfg).stream.samples for r in refs}
    assert set(keys) == chosen and 10 <= len(chosen) <= 30


def test_a_pool_of_several_folders_names_each_sample_s_folder(tmp_path):
    """``Batch.source`` is the index of the folder each sample came from (what the guard rail tracks per source),
    through worker processes and shuffling."""
    folders = []
    for i, n in enumerate((9, 5)):
        src = write_dataset(tmp_path / f"src{i}", 2, 24, seed=i, n_unlabeled=n)
        for f in (src / "unlabeled").iterdir():  # distinct keys per folder
            f.rename(f.with_name(f"site{i}_{f.name}"))
        shard_dataset(tmp_path / f"out{i}", unlabeled=src / "unlabeled", shard_size=3)
        folders.append(tmp_path / f"out{i}")
    keys_of = [{r.key for refs in build_loader(f, "unlabeled").stream.samples for r in refs} for f in folders]
    cfg = StreamConfig(batch_size=4, num_workers=2, augment=AugmentConfig(crop_size=16))
    seen = Counter()
    for batch in build_loader(folders, "unlabeled", cfg):
        assert batch.source.dtype == torch.int64 and batch.source.shape == (len(batch.key),)
        for key, source in zip(batch.key, batch.source.tolist()):
            assert key in keys_of[source]
            seen[source] += 1
    assert seen[0] >= 9 and seen[1] >= 5
