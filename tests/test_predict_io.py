"""Prediction on files: GeoTIFF round trips, PNG outputs, bad input, the CLI, real aerial images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from distseg.cli import app  # noqa: E402
from distseg.predict import PredictConfig, PredictError, predict_file, predict_paths  # noqa: E402
from tests.test_predict import conv_model, random_image, tiny_class_map, whole_image  # noqa: E402

DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai_aerial" / "images"
CRS_UTM = CRS.from_epsg(32640)
TRANSFORM = from_origin(500000.0, 2800000.0, 0.5, 0.5)


def write_geotiff(path: Path, image: np.ndarray, nodata: int | None = 0, crs=CRS_UTM, transform=TRANSFORM) -> Path:
    """A band-first GeoTIFF of an H×W×B uint array."""
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[1], height=image.shape[0],
                       count=image.shape[2], dtype=image.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(np.moveaxis(image, -1, 0))
    return path


def geo_image(h: int = 170, w: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Random pixels (never 0) with a nodata (0) corner; returns the image and its validity."""
    image = np.random.default_rng(1).integers(1, 256, (h, w, 3), dtype=np.uint8)
    valid = np.ones((h, w), dtype=bool)
    valid[:60, :90] = False
    image[~valid] = 0
    return image, valid


def test_geotiff_round_trip_keeps_crs_transform_nodata_and_equals_whole_image(tmp_path):
    image, valid = geo_image()
    src = write_geotiff(tmp_path / "scene.tif", image)
    cfg = PredictConfig(tile=64, overlap=0.25, chunk_width=128, overlay=True, confidence=True)
    summary = predict_file(conv_model(), tiny_class_map(), src, tmp_path / "out", cfg, progress=False)
    labels, conf = whole_image(conv_model(), image)
    labels[~valid] = 255
    with rasterio.open(tmp_path / "out" / "scene_mask.tif") as ds:
        assert (ds.crs, ds.transform, ds.nodata, ds.shape, ds.count) == (CRS_UTM, TRANSFORM, 255, image.shape[:2], 1)
        np.testing.assert_array_equal(ds.read(1), labels)
        assert ds.colormap(1)[2][:3] == (30, 30, 200)
    with rasterio.open(tmp_path / "out" / "scene_confidence.tif") as ds:
        assert ds.nodata == 0 and ds.crs == CRS_UTM
        np.testing.assert_allclose(ds.read(1)[valid], np.round(conf[valid] * 255), atol=1)
        assert (ds.read(1)[~valid] == 0).all()
    for kind in ("color", "overlay"):
        with rasterio.open(tmp_path / "out" / f"scene_{kind}.tif") as ds:
            assert ds.count == 3 and ds.transform == TRANSFORM
    color = rasterio.open(tmp_path / "out" / "scene_color.tif").read()
    np.testing.assert_array_equal(np.moveaxis(color, 0, -1)[valid], tiny_class_map().decode_colors(labels)[valid])
    assert summary["pixel_area_m2"] == pytest.approx(0.25)
    counts = np.bincount(labels[valid], minlength=4)
    assert [c["pixels"] for c in summary["classes"]] == counts.tolist()
    assert summary["classes"][1]["area_m2"] == pytest.approx(counts[1] * 0.25)
    assert summary["nodata_pixels"] == int((~valid).sum())
    assert json.loads((tmp_path / "out" / "scene_summary.json").read_text()) == summary
    assert not list((tmp_path / "out").glob(".*partial"))


def test_geotiff_without_projection_has_no_area_and_rows_span_tiff_strips(tmp_path):
    image = random_image(600, 90)  # several 256-row TIFF strips, written in whole strips
    src = write_geotiff(tmp_path / "plain.tif", image, nodata=None, crs=None, transform=from_origin(0, 0, 1, 1))
    summary = predict_file(conv_model(), tiny_class_map(), src, tmp_path, PredictConfig(tile=64), progress=False)
    assert summary["pixel_area_m2"] is None and summary["classes"][0]["area_m2"] is None
    with rasterio.open(tmp_path / "plain_mask.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), whole_image(conv_model(), image)[0])


def test_combined_summary_adds_pixels_and_areas(tmp_path):
    from distseg.inference.summary import combine

    image, _ = geo_image()
    for name in ("a", "b"):
        write_geotiff(tmp_path / f"{name}.tif", image)
    summaries = predict_paths(conv_model(), tiny_class_map(), [tmp_path], tmp_path / "out", PredictConfig(tile=64),
                              progress=False)
    total = combine(summaries)
    assert [c["pixels"] for c in total["classes"]] == [2 * c["pixels"] for c in summaries[0]["classes"]]
    assert total["classes"][0]["area_m2"] == pytest.approx(2 * summaries[0]["classes"][0]["area_m2"])
    assert total["nodata_pixels"] == 2 * summaries[0]["nodata_pixels"] and total["input"] == "2 files"


def test_png_outputs_have_the_input_size_and_expected_content(tmp_path):
    image = random_image(77, 133)
    Image.fromarray(image).save(tmp_path / "tile.png")
    cfg = PredictConfig(tile=64, overlay=True, confidence=True, overlay_alpha=1.0)
    predict_paths(conv_model(), tiny_class_map(), [tmp_path], tmp_path / "out", cfg, progress=False)
    labels = whole_image(conv_model(), image)[0]
    mask = np.asarray(Image.open(tmp_path / "out" / "tile_mask.png"))
    np.testing.assert_array_equal(mask, labels)
    colors = tiny_class_map().decode_colors(labels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "tile_color.png")), colors)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "tile_overlay.png")), colors)
    assert np.asarray(Image.open(tmp_path / "out" / "tile_confidence.png")).shape == (77, 133)


def test_existing_output_needs_force(tmp_path):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_mask.png").write_bytes(b"old")
    cfg = PredictConfig(tile=32)
    with pytest.raises(PredictError, match="a_mask.png: output exists; pass --force"):
        predict_paths(conv_model(), tiny_class_map(), [tmp_path / "a.png"], tmp_path / "out", cfg, progress=False)
    cfg = PredictConfig(tile=32, force=True)
    predict_paths(conv_model(), tiny_class_map(), [tmp_path / "a.png"], tmp_path / "out", cfg, progress=False)
    assert np.asarray(Image.open(tmp_path / "out" / "a_mask.png")).shape == (40, 40)


def test_failure_mid_raster_leaves_no_outputs(tmp_path):
    class FailsLater(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("device lost")
            return torch.zeros(x.shape[0], 4, *x.shape[2:])

    src = write_geotiff(tmp_path / "big.tif", random_image(600, 300))
    with pytest.raises(RuntimeError, match="device lost"):
        predict_file(FailsLater(), tiny_class_map(), src, tmp_path / "out", PredictConfig(tile=64, batch_size=1),
                     progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_band_count_and_dtype_errors_say_how_to_fix(tmp_path):
    four = write_geotiff(tmp_path / "rgbn.tif", random_image(50, 50)[:, :, [0, 1, 2, 0]], nodata=None)
    with pytest.raises(PredictError, match=r"rgbn.tif: has 4 band\(s\).*--bands 1,2,3"):
        predict_file(conv_model(), tiny_class_map(), four, tmp_path, PredictConfig(tile=32), progress=False)
    predict_file(conv_model(), tiny_class_map(), four, tmp_path, PredictConfig(tile=32, bands=(3, 2, 1)),
                 progress=False)
    with pytest.raises(PredictError, match="out of range"):
        predict_file(conv_model(), tiny_class_map(), four, tmp_path / "x", PredictConfig(tile=32, bands=(1, 2, 5)),
                     progress=False)
    deep = write_geotiff(tmp_path / "deep.tif", random_image(50, 50).astype(np.uint16) * 16)
    with pytest.raises(PredictError, match="deep.tif: pixels are uint16.*--scale"):
        predict_file(conv_model(), tiny_class_map(), deep, tmp_path, PredictConfig(tile=32), progress=False)
    gray = tmp_path / "gray.png"
    Image.fromarray(random_image(20, 20)[:, :, 0]).save(gray)
    with pytest.raises(PredictError, match="has 1 band"):
        predict_file(conv_model(), tiny_class_map(), gray, tmp_path, PredictConfig(tile=32), progress=False)


def test_unsupported_and_colliding_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PredictError, match="notes.txt: unsupported file type '.txt'"):
        predict_paths(conv_model(), tiny_class_map(), [tmp_path / "notes.txt"], tmp_path / "o", PredictConfig(),
                      progress=False)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(random_image(20, 20)).save(tmp_path / sub / "x.png")
    with pytest.raises(PredictError, match="would both write"):
        predict_paths(conv_model(), tiny_class_map(), [tmp_path / "a", tmp_path / "b"], tmp_path / "o",
                      PredictConfig(), progress=False)


def test_folders_expand_to_supported_visible_files_sorted(tmp_path):
    from distseg.inference.raster import expand_inputs

    for name in ("b.jpg", "a.TIF", ".a_mask.png.partial", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.TIF", "b.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="empty: folder holds no"):
        expand_inputs([tmp_path / "empty"])


# ---- CLI ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_loader(monkeypatch):
    """Stand in for checkpoint loading: a 4-class 1×1-conv model with a 4-class map."""
    import distseg.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_inference_model",
                        lambda path, device="cpu", **kw: (conv_model().to(device), tiny_class_map()))


def test_cli_writes_outputs_and_prints_area_table(tmp_path, fake_loader):
    image, _ = geo_image(90, 120)
    write_geotiff(tmp_path / "scene.tif", image)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / "scene.tif"), "--out",
                                      str(tmp_path / "out"), "--tile", "64", "--device", "cpu", "--tta"])
    assert result.exit_code == 0, result.output
    assert "area m²" in result.output and "c0" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene_color.tif", "scene_mask.qml",
                                                                   "scene_mask.tif", "scene_summary.json"]


@pytest.mark.parametrize("extra,message", [
    (["--bands", "1,x"], "--bands '1,x'"),
    (["--overlap", "0.95"], "overlap must be"),
    (["--device", "tpu9"], "not a torch device"),
    (["--classes", "{classes5}"], "the weights and the class map disagree"),
    (["--out", "{existing}"], "output exists; pass --force"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, fake_loader, extra, message):
    Image.fromarray(random_image(40, 40)).save(tmp_path / "a.png")
    classes5 = tmp_path / "classes5.json"
    classes5.write_text(json.dumps(tiny_class_map(5).to_dict()))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "a_mask.png").write_bytes(b"")
    (tmp_path / "stage").mkdir()
    extra = [e.format(classes5=classes5, existing=tmp_path / "existing") for e in extra]
    device = [] if "--device" in extra else ["--device", "cpu"]
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / "a.png"), "--out",
                                      str(tmp_path / "out"), *device, *extra])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


# ---- real aerial images --------------------------------------------------------------------------------

def test_real_images_of_different_sizes_give_outputs_of_the_input_size(tmp_path):
    if not DUBAI.is_dir():
        pytest.skip(f"real data not found at {DUBAI} (the shared data folder beside the repository)")
    files = sorted(DUBAI.glob("*.jpg"))
    sizes = {Image.open(f).size: f for f in files}
    picked = [sizes[s] for s in sorted(sizes, key=lambda s: s[0] * s[1])[:: max(1, len(sizes) // 3)]][:3]
    assert len({Image.open(f).size for f in picked}) == len(picked) >= 2
    cfg = PredictConfig(tile=256, overlap=0.25, batch_size=8, confidence=True)
    summaries = predict_paths(conv_model(), tiny_class_map(), picked, tmp_path, cfg, progress=False)
    for f, summary in zip(picked, summaries):
        w, h = Image.open(f).size
        for kind in ("mask", "color", "confidence"):
            assert Image.open(tmp_path / f"{f.stem}_{kind}.png").size == (w, h)
        assert (summary["height"], summary["width"]) == (h, w)
        assert sum(c["pixels"] for c in summary["classes"]) == h * w


def test_cli_end_to_end_with_a_real_weights_file(tmp_path):
    """The real loading path: weights file + model config + class map, then the loaded model's class check."""
    import yaml

    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    mcfg = dict(backbone="test_resnet", num_classes=4, psa="none", aspp_channels=16, decoder_channels=16,
                low_level_channels=8)
    save_weights(build_model(ModelConfig(**mcfg)), tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(mcfg))
    (tmp_path / "classes.json").write_text(json.dumps(tiny_class_map(4).to_dict()))
    Image.fromarray(random_image(70, 110)).save(tmp_path / "a.jpg")
    args = ["predict", str(tmp_path / "model.safetensors"), str(tmp_path / "a.jpg"), "--out", str(tmp_path / "out"),
            "--model", str(tmp_path / "model.yaml"), "--classes", str(tmp_path / "classes.json"), "--tile", "64",
            "--device", "cpu", "--overlay", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for kind in ("mask", "color", "overlay"):
        assert Image.open(tmp_path / "out" / f"a_{kind}.png").size == (110, 70)
    result = CliRunner().invoke(app, args[:5] + ["--out", str(tmp_path / "out2"), "--device", "cpu"])
    assert result.exit_code == 2 and "--model" in result.output


def test_web_mercator_pixel_area_is_scaled_to_the_ground():
    """EPSG:3857 map units are metres only at the equator: at 60° N a 1×1 map-unit pixel covers 0.25 m²."""
    import math

    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from distseg.inference.raster import WEB_MERCATOR_RADIUS, GeoInfo

    y60 = WEB_MERCATOR_RADIUS * math.log(math.tan(math.pi / 4 + math.radians(60) / 2))
    assert GeoInfo(CRS.from_epsg(3857), from_origin(1000.0, y60, 1.0, 1.0)).pixel_area_m2 == pytest.approx(0.25)
    assert GeoInfo(CRS.from_epsg(3857), from_origin(0.0, 0.0, 2.0, 2.0)).pixel_area_m2 == pytest.approx(4.0)
    assert GeoInfo(CRS.from_epsg(32633), from_origin(0.0, y60, 1.0, 1.0)).pixel_area_m2 == pytest.approx(1.0)
