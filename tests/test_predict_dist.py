"""Windows split across ranks: a real 2-process gloo run gives the single-process result, written once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distseg.inference.sliding import WindowPlan
from distseg.predict import PredictConfig, predict_array, predict_file
from tests.test_predict import conv_model, random_image, tiny_class_map, whole_image

CFG = PredictConfig(tile=64, overlap=0.25, chunk_width=128, batch_size=2)
SHAPE = (150, 260)


class CountingModel(torch.nn.Module):
    """The 1×1-conv model, counting the windows it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = conv_model()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.inner(x)


def _worker(rank: int, world_size: int, tmp: str) -> None:
    """One rank: predict an array and a file, record what it computed and returned."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                                         world_size=world_size)
    try:
        model = CountingModel()
        pred = predict_array(model, random_image(*SHAPE), 4, CFG)
        summary = predict_file(conv_model(), tiny_class_map(), Path(tmp) / "in.png", Path(tmp) / "out", CFG,
                               progress=False)
        result = {"windows": model.windows, "returned": pred is not None, "summary": summary is not None}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))
        if pred is not None:
            np.save(Path(tmp) / "labels.npy", pred.labels)
            np.save(Path(tmp) / "confidence.npy", pred.confidence)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_split_windows_and_match_single_process(tmp_path):
    from PIL import Image

    image = random_image(*SHAPE)
    Image.fromarray(random_image(90, 100, seed=3)).save(tmp_path / "in.png")
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    plan = WindowPlan.build(*SHAPE, CFG)
    assert [r["windows"] for r in ranks] == [plan.num_windows(0, 2), plan.num_windows(1, 2)]
    assert sum(r["windows"] for r in ranks) == plan.num_windows()
    assert [r["returned"] for r in ranks] == [True, False] and [r["summary"] for r in ranks] == [True, False]
    labels, conf = whole_image(conv_model(), image)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), labels)
    np.testing.assert_allclose(np.load(tmp_path / "confidence.npy"), conf, atol=1e-6)
    mask = np.asarray(Image.open(tmp_path / "out" / "in_mask.png"))
    np.testing.assert_array_equal(mask, whole_image(conv_model(), random_image(90, 100, seed=3))[0])
