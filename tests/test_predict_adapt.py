"""``predict --adapt-bn``: the model's BatchNorm statistics come from the inputs' fully valid, non-overlapping
windows (batched by shape across files), and the prediction is the one the adapted model makes."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distseg.inference.adapt import plan_windows
from distseg.inference.sliding import mirror_pad
from distseg.ops.adabn import batchnorm_layers, reestimate_bn
from distseg.predict import PredictConfig, PredictError, predict_array, predict_paths
from tests.test_predict import random_image, tiny_class_map

rasterio = pytest.importorskip("rasterio")
from tests.test_predict_io import write_geotiff  # noqa: E402


def bn_model(seed: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU-conv: 3 classes at the input size, with statistics far from any image's."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 3, 1)).eval()
    model[1].running_mean.fill_(3.0)
    return model


def _stats(model) -> list[torch.Tensor]:
    return [t.clone() for m in batchnorm_layers(model) for t in (m.running_mean, m.running_var)]


def test_chips_are_batched_across_files_and_the_prediction_uses_their_statistics(tmp_path):
    chips = [random_image(40, 40, seed=s) for s in range(5)]
    for i, chip in enumerate(chips):
        Image.fromarray(chip).save(tmp_path / f"chip{i}.png")
    cfg = PredictConfig(tile=64, batch_size=2, size_multiple=8, color=False, adapt_bn=True)
    model = bn_model()
    summaries = predict_paths(model, tiny_class_map(3), [tmp_path], tmp_path / "out", cfg, progress=False)
    assert [s["adapt_bn"] for s in summaries] == [{"windows": 4, "inputs": 5}] * 5, "the odd fifth chip is left out"
    reference = bn_model()
    reestimate_bn(reference, [torch.from_numpy(np.stack(chips[i:i + 2])).permute(0, 3, 1, 2).float() / 255
                              for i in (0, 2)])
    for a, b in zip(_stats(model), _stats(reference)):
        torch.testing.assert_close(a, b)
    saved = json.loads((tmp_path / "out" / "chip3_summary.json").read_text())
    assert saved["adapt_bn"] == {"windows": 4, "inputs": 5}
    mask = np.asarray(Image.open(tmp_path / "out" / "chip3_mask.png"))
    plain = PredictConfig(tile=64, batch_size=2, size_multiple=8)
    expected = predict_array(reference, chips[3], 3, plain)
    assert np.array_equal(mask, expected.labels)
    assert not np.array_equal(mask, predict_array(bn_model(), chips[3], 3, plain).labels), "adaptation changed nothing"


def test_windows_do_not_overlap_and_nodata_windows_are_left_out(tmp_path):
    image = random_image(96, 160, seed=3)
    image[image == 0] = 1
    image[:20, :20] = 0  # nodata corner: touches the first window only
    path = write_geotiff(tmp_path / "ortho.tif", image, nodata=0)
    cfg = PredictConfig(tile=32, batch_size=4, adapt_bn=True)
    windows = plan_windows([path], cfg)
    assert [(w.y, w.x) for w in windows] == [(y, x) for y in (0, 32, 64) for x in (0, 32, 64, 96, 128)]
    model = bn_model()
    predict_paths(model, tiny_class_map(3), [path], tmp_path / "out", cfg, progress=False)
    kept = [image[w.y:w.y + 32, w.x:w.x + 32] for w in windows[1:]]
    reference = bn_model()
    batches = [np.stack(kept[i:i + 4]) for i in range(0, 14, 4)]  # 4, 4, 4, 2
    reestimate_bn(reference, [torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255 for b in batches])
    for a, b in zip(_stats(model), _stats(reference)):
        torch.testing.assert_close(a, b)


def test_inputs_without_two_valid_windows_are_one_error(tmp_path):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "one.png")
    model = bn_model()
    before = copy.deepcopy(model.state_dict())
    cfg = PredictConfig(tile=64, size_multiple=8, adapt_bn=True)
    with pytest.raises(PredictError, match="--adapt-bn: .*saw no image"):
        predict_paths(model, tiny_class_map(3), [tmp_path / "one.png"], tmp_path / "out", cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mirror_pad_reflects_the_cut_window_out_to_the_model_size():
    pixels = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    padded = mirror_pad(pixels, 4, 5)
    rows = [0, 1, 1, 0]  # symmetric: the edge pixel is repeated, then the one before it
    cols = [0, 1, 2, 2, 1]
    assert np.array_equal(padded, pixels[rows][:, cols])
    assert mirror_pad(pixels, 2, 3) is pixels


def test_each_window_is_read_once(tmp_path, monkeypatch):
    """Validity and pixels of an adaptation window are each read once (a GeoTIFF read is I/O)."""
    import distseg.inference.adapt as adapt

    image = random_image(64, 96, seed=5)
    image[image == 0] = 1
    path = write_geotiff(tmp_path / "ortho.tif", image, nodata=0)
    cfg = PredictConfig(tile=32, batch_size=4, adapt_bn=True)
    calls = {"read": 0, "read_valid": 0}
    opened = adapt.open_reader

    def counting_reader(*args, **kwargs):
        reader = opened(*args, **kwargs)
        for name in calls:
            method = getattr(reader, name)

            def counted(*a, _method=method, _name=name):
                calls[_name] += 1
                return _method(*a)
            setattr(reader, name, counted)
        return reader

    monkeypatch.setattr(adapt, "open_reader", counting_reader)
    windows = plan_windows([path], cfg)
    batches = list(adapt.window_batches(windows, cfg, torch.device("cpu")))
    assert sum(len(b) for b in batches) == len(windows) == 6
    assert calls == {"read": 6, "read_valid": 6}
    torch.testing.assert_close(batches[0][0], torch.from_numpy(image[:32, :32]).permute(2, 0, 1).float() / 255)
