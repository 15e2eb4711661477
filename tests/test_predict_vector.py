"""Map outputs of `distseg predict`: polygons (--vector), cloud-optimised GeoTIFF (--cog), QGIS styles,
web-map tile georeferencing and object-level scores (--truth/--objects)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from PIL import Image

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
fiona = pytest.importorskip("fiona")
pytest.importorskip("scipy")
from rasterio.crs import CRS  # noqa: E402
from rasterio.features import rasterize  # noqa: E402
from shapely.geometry import Polygon, box, shape  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from distseg.cli import app  # noqa: E402
from distseg.data.classes import ClassMap  # noqa: E402
from distseg.inference.georef import WEB_MERCATOR_HALF, tile_geo  # noqa: E402
from distseg.inference.objects import ObjectScore, match_objects  # noqa: E402
from distseg.inference.outline import regularize  # noqa: E402
from distseg.inference.polygonize import Polygonizer  # noqa: E402
from distseg.inference.styles import qml  # noqa: E402
from distseg.inference.vector import VectorConfig, parse_amount  # noqa: E402
from distseg.predict import PredictConfig, PredictError, predict_paths  # noqa: E402
from tests.test_predict import conv_model, tiny_class_map  # noqa: E402
from tests.test_predict_io import CRS_UTM, TRANSFORM, write_geotiff  # noqa: E402

BUILDINGS = ClassMap.from_dict({"classes": [{"name": "background", "value": 0, "color": [20, 20, 20]},
                                            {"name": "building", "value": 1, "color": [230, 60, 40]}]})


def red_model() -> torch.nn.Module:
    """Building where the red channel is above one half (a 1×1 convolution, so tiling changes nothing)."""
    model = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, 0] = 20.0
        model.bias.copy_(torch.tensor([0.0, -10.0]))
    return model


def scene(h: int = 100, w: int = 150, boxes=((30, 70, 50, 110),)) -> np.ndarray:
    """Dark image with red rectangles (row0, row1, col0, col1) standing for buildings."""
    image = np.full((h, w, 3), 40, dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        image[r0:r1, c0:c1, 0] = 220
    return image


def read_layer(path: Path) -> tuple[list[dict], CRS]:
    with fiona.open(path) as src:
        return [{"geometry": shape(f.geometry), **dict(f.properties)} for f in src], CRS.from_wkt(src.crs_wkt)


# ---- polygons from a streamed prediction ------------------------------------------------------------

def test_polygons_rasterise_back_to_the_class_mask_in_the_raster_crs(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(image[::6, ::6], 6, 0), 6, 1)[:90, :130]  # blocky regions, many of them
    write_geotiff(tmp_path / "scene.tif", image, nodata=None)
    cfg = PredictConfig(tile=32, chunk_width=48, vector=VectorConfig(tmp_path / "scene.gpkg", simplify=0.0))
    predict_paths(conv_model(), tiny_class_map(), [tmp_path / "scene.tif"], tmp_path / "out", cfg, progress=False)
    mask = rasterio.open(tmp_path / "out" / "scene_mask.tif").read(1)
    features, crs = read_layer(tmp_path / "scene.gpkg")
    assert crs == CRS_UTM
    names = tiny_class_map().names
    assert len({f["class"] for f in features}) >= 2 and len(features) > 20
    for index, name in enumerate(names):
        shapes = [(f["geometry"], 1) for f in features if f["class"] == name]
        back = rasterize(shapes, out_shape=mask.shape, transform=TRANSFORM) if shapes else np.zeros_like(mask)
        truth = mask == index
        if not truth.any():
            assert not shapes
            continue
        iou = (truth & (back == 1)).sum() / max((truth | (back == 1)).sum(), 1)
        assert iou >= 0.98, (name, iou)
    pixel_area = 0.5 * 0.5
    for f in features:
        assert f["pixels"] * pixel_area == pytest.approx(f["area_m2"], abs=1e-3)
        assert f["geometry"].area == pytest.approx(f["area_m2"], abs=1e-3)  # UTM: map units are metres
        assert 0.0 < f["confidence"] <= 1.0
        assert f["source"] == "scene.tif"
    left, bottom, right, top = rasterio.open(tmp_path / "scene.tif").bounds
    xs, ys = zip(*(xy for f in features for xy in f["geometry"].exterior.coords))
    assert left <= min(xs) and max(xs) <= right and bottom <= min(ys) and max(ys) <= top


def test_a_building_across_window_and_chunk_borders_is_one_polygon_with_its_area(tmp_path):
    write_geotiff(tmp_path / "site.tif", scene(), nodata=None)
    out = tmp_path / "buildings.gpkg"
    cfg = PredictConfig(tile=32, overlap=0.25, chunk_width=64,
                        vector=VectorConfig(out, classes=("building",), simplify=0.0))
    predict_paths(red_model(), BUILDINGS, [tmp_path / "site.tif"], tmp_path / "out", cfg, progress=False)
    features, _ = read_layer(out)
    assert len(features) == 1
    building = features[0]
    x0, y0 = TRANSFORM @ (50, 30)
    x1, y1 = TRANSFORM @ (110, 70)
    assert building["geometry"].equals(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    assert building["pixels"] == 40 * 60 and building["area_m2"] == pytest.approx(40 * 60 * 0.25)
    assert building["perimeter_m"] == pytest.approx(2 * (40 + 60) * 0.5)
    assert building["confidence"] > 0.99


def test_polygonizer_joins_a_ring_that_closes_in_a_later_chunk():
    """A U-shaped region opens in the first chunk and closes in the second: one polygon with a hole."""
    labels = np.zeros((12, 12), dtype=np.uint8)
    labels[2:10, 2:10] = 1
    labels[4:8, 4:8] = 0
    confidence = np.linspace(0.5, 1.0, 144, dtype=np.float32).reshape(12, 12)
    polygonizer, regions = Polygonizer(12, 12, [1]), []
    for x0, x1 in ((0, 7), (7, 12)):
        for y in range(0, 12, 3):
            regions += polygonizer.add(y, x0, labels[y:y + 3, x0:x1], confidence[y:y + 3, x0:x1])
            if x0 == 0:  # the first chunk holds only part of the ring: nothing may be handed out yet
                assert regions == []
    assert list(polygonizer.finish()) == [] and len(regions) == 1  # handed out as soon as it was complete
    ring = regions[0]
    assert ring.geometry.equals(Polygon([(2, 2), (10, 2), (10, 10), (2, 10)], [[(4, 4), (8, 4), (8, 8), (4, 8)]]))
    assert ring.pixels == 48 and ring.confidence_sum == pytest.approx(confidence[labels == 1].sum(), rel=1e-6)


def test_geojson_is_in_lon_lat_at_the_raster_position(tmp_path):
    write_geotiff(tmp_path / "site.tif", scene(), nodata=None)
    out = tmp_path / "buildings.geojson"
    cfg = PredictConfig(tile=64, vector=VectorConfig(out, classes=("building",)))
    predict_paths(red_model(), BUILDINGS, [tmp_path / "site.tif"], tmp_path / "out", cfg, progress=False)
    data = json.loads(out.read_text())
    assert "crs" not in data or "4326" in json.dumps(data["crs"]) or "CRS84" in json.dumps(data["crs"])
    features, crs = read_layer(out)
    assert crs.to_epsg() == 4326 and len(features) == 1
    centre = features[0]["geometry"].centroid
    from rasterio.warp import transform

    (lon,), (lat,) = transform(CRS_UTM, "EPSG:4326", *map(list, zip(TRANSFORM @ (80, 50))))
    assert (centre.x, centre.y) == pytest.approx((lon, lat), abs=1e-6)
    assert 50 < lon < 60 and 20 < lat < 30  # UTM zone 40N: east of the Gulf, lon first
    assert features[0]["area_m2"] == pytest.approx(40 * 60 * 0.25, rel=1e-3)  # measured back in UTM


def test_min_area_fill_holes_and_pixel_tolerance(tmp_path):
    image = scene(boxes=((10, 40, 10, 40), (60, 63, 100, 103)))
    image[20:25, 20:25, 0] = 40  # a courtyard in the big building
    write_geotiff(tmp_path / "site.tif", image, nodata=None)
    runs = {"keep": dict(min_area=5.0), "fill": dict(min_area=5.0, fill_holes=True),
            "tiny": dict(min_area=9.0, min_area_in_pixels=True)}
    got = {}
    for name, options in runs.items():
        cfg = PredictConfig(tile=64, force=True,
                            vector=VectorConfig(tmp_path / f"{name}.gpkg", classes=("building",), **options))
        predict_paths(red_model(), BUILDINGS, [tmp_path / "site.tif"], tmp_path / "out", cfg, progress=False)
        got[name] = read_layer(tmp_path / f"{name}.gpkg")[0]
    assert [len(got[k]) for k in runs] == [1, 1, 2]  # the 3×3 px (2.25 m²) speck goes below 5 m², stays at 9 px
    assert len(got["keep"][0]["geometry"].interiors) == 1 and len(got["fill"][0]["geometry"].interiors) == 0


# ---- regularisation -------------------------------------------------------------------------------

def test_regularize_squares_a_staircase_rotated_rectangle():
    truth = shapely.affinity.rotate(box(20, 30, 80, 60), 25, origin="centroid")
    mask = rasterize([(truth, 1)], out_shape=(100, 100))
    staircase = shapely.union_all([box(c, r, c + 1, r + 1) for r, c in zip(*np.nonzero(mask))])
    squared = regularize(staircase, 1.0)
    coords = np.asarray(shapely.remove_repeated_points(squared).exterior.coords)[:-1]
    edges = np.roll(coords, -1, 0) - coords
    for a, b in zip(edges, np.roll(edges, -1, 0)):  # every corner is a right angle
        assert abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)) < 1e-6
    angles = np.degrees(np.arctan2(edges[:, 1], edges[:, 0])) % 90
    assert np.all(np.minimum(abs(angles - 25), 90 - abs(angles - 25)) < 3)  # walls along the true rectangle
    assert squared.intersection(truth).area / squared.union(truth).area > 0.9


# ---- bad input: one line, nothing written ---------------------------------------------------------

def fake_buildings(monkeypatch):
    import distseg.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_inference_model", lambda path, device="cpu", **kw: (red_model(), BUILDINGS))


@pytest.mark.parametrize("input_name,extra,message", [
    ("chip.png", ["--vector", "{tmp}/b.gpkg"], "has no georeferencing"),
    ("site.tif", ["--vector", "{tmp}/b.gpkg", "--vector-classes", "roof"], "unknown class 'roof'"),
    ("site.tif", ["--vector", "{tmp}/b.gpkg", "--regularize", "roof"], "unknown class 'roof'"),
    ("site.tif", ["--vector", "{tmp}/file.txt/b.gpkg"], "does not exist"),
    ("site.tif", ["--vector", "{tmp}/b.shp"], "unsupported format '.shp'"),
    ("site.tif", ["--vector", "{tmp}/b.gpkg", "--simplify", "fine"], "--simplify 'fine'"),
    ("chip.png", ["--cog"], "--cog needs GeoTIFF outputs"),
    ("site.tif", ["--truth", "{tmp}/masks", "--objects", "roof"], "unknown class 'roof'"),
    ("site.tif", ["--truth", "{tmp}/masks", "--objects", "building"], "no ground-truth mask site.png/.tif"),
    ("site.tif", ["--objects", "building"], "--truth and --objects go together"),
    ("chip-1-2-1.png", ["--georef-from-name", "--vector", "{tmp}/b.gpkg"], "outside the web-map grid"),
])
def test_cli_bad_map_options_are_one_line_and_leave_nothing(tmp_path, monkeypatch, input_name, extra, message):
    fake_buildings(monkeypatch)
    write_geotiff(tmp_path / "site.tif", scene(40, 40), nodata=None)
    Image.fromarray(scene(40, 40)).save(tmp_path / input_name if input_name.endswith(".png") else tmp_path / "x.png")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "masks").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [e.format(tmp=tmp_path) for e in extra]
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / input_name), "--out",
                                      str(tmp_path / "out"), "--device", "cpu", "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out folder, no partial vector file


def test_failure_mid_run_removes_the_partial_vector_file(tmp_path):
    write_geotiff(tmp_path / "a.tif", scene(), nodata=None)
    write_geotiff(tmp_path / "b.tif", scene()[:, :, :2], nodata=None)  # two bands: fails when opened
    cfg = PredictConfig(tile=64, vector=VectorConfig(tmp_path / "b.gpkg"))
    with pytest.raises(PredictError, match="has 2 band"):
        predict_paths(red_model(), BUILDINGS, [tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "out", cfg,
                      progress=False)
    assert not any(p.name.endswith(".gpkg") for p in tmp_path.iterdir())


# ---- cloud-optimised GeoTIFF and QGIS style -------------------------------------------------------

def test_cog_has_mode_overviews_colour_table_and_georeferencing(tmp_path):
    # 2×2 cells of three building pixels and one background pixel: the mode is building everywhere,
    # an average would not be; the raster is big enough for GDAL to add overviews.
    h, w = 1024, 1024
    image = scene(h, w, boxes=((0, h, 0, w),))
    image[::2, ::2, 0] = 40
    write_geotiff(tmp_path / "big.tif", image, nodata=None)
    cfg = PredictConfig(tile=512, overlap=0.0, cog=True, color=False)
    predict_paths(red_model(), BUILDINGS, [tmp_path / "big.tif"], tmp_path / "out", cfg, progress=False)
    with rasterio.open(tmp_path / "out" / "big_mask.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.overviews(1) and src.crs == CRS_UTM and src.transform == TRANSFORM and src.nodata == 255
        assert src.colormap(1)[1][:3] == (230, 60, 40)
        full = src.read(1)
        overview = src.read(1, out_shape=(h // src.overviews(1)[0], w // src.overviews(1)[0]))
    assert (full == 0).mean() == pytest.approx(0.25) and np.all(overview == 1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big_mask.qml", "big_mask.tif", "big_summary.json"]


def test_qml_style_names_and_colours_every_class():
    root = ElementTree.fromstring(qml(["background", "building"], [(20, 20, 20), (230, 60, 40)], 255).split("\n", 1)[1])
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(e.get("value"), e.get("label"), e.get("color")) for e in renderer.find("colorPalette")]
    assert entries == [("0", "background", "#141414"), ("1", "building", "#e63c28")]


# ---- web-map tile georeferencing ------------------------------------------------------------------

def test_tile_name_gives_the_slippy_map_bounds(tmp_path):
    from rasterio.warp import transform_bounds

    x, y, z = 1263582, 1056186, 21
    geo = tile_geo(Path(f"nairobi_OAM-{x}-{y}-{z}.jpg"), 256, 256)
    assert geo.crs.to_epsg() == 3857
    size = 2 * WEB_MERCATOR_HALF / 2 ** z
    assert geo.transform.a == pytest.approx(size / 256) and geo.transform.e == pytest.approx(-size / 256)
    west, south, east, north = transform_bounds(geo.crs, "EPSG:4326", *rasterio.transform.array_bounds(256, 256,
                                                                                                     geo.transform))

    def lon(tx: int) -> float:
        return tx / 2 ** z * 360 - 180

    def lat(ty: int) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * ty / 2 ** z))))

    assert (west, east, north, south) == pytest.approx((lon(x), lon(x + 1), lat(y), lat(y + 1)), abs=1e-9)
    assert 36.8 < west < 37.0 and -1.4 < south < -1.2  # Mukuru, Nairobi


def test_georef_from_name_places_chip_outputs_on_the_map(tmp_path):
    chip = tmp_path / "site_OAM-1263582-1056186-21.png"
    Image.fromarray(scene(256, 256, boxes=((100, 140, 60, 200),))).save(chip)
    cfg = PredictConfig(tile=256, georef_from_name=True,
                        vector=VectorConfig(tmp_path / "b.gpkg", classes=("building",), regularize=("building",)))
    predict_paths(red_model(), BUILDINGS, [chip], tmp_path / "out", cfg, progress=False)
    geo = tile_geo(chip, 256, 256)
    with rasterio.open(tmp_path / "out" / f"{chip.stem}_mask.tif") as src:
        assert src.crs.to_epsg() == 3857 and src.transform == geo.transform
    (building,), crs = read_layer(tmp_path / "b.gpkg")
    assert crs.to_epsg() == 3857
    x0, y0 = geo.transform @ (60, 100)
    x1, y1 = geo.transform @ (200, 140)
    assert building["geometry"].equals_exact(box(x0, y1, x1, y0), 1e-6) or \
        building["geometry"].symmetric_difference(box(x0, y1, x1, y0)).area < 1e-6
    # Web-Mercator square metres -> ground: E-W scale N·cos φ / a, N-S scale M·cos φ / a on the WGS 84 ellipsoid
    # (N, M: its radii of curvature), i.e. (1 − e²)·cos²φ / (1 − e²·sin²φ)²; UTM adds at most 0.1 % here.
    e2, phi = 0.00669437999014, math.radians(-1.306)
    ground = 40 * 140 * geo.transform.a ** 2 * (1 - e2) * math.cos(phi) ** 2 / (1 - e2 * math.sin(phi) ** 2) ** 2
    assert building["area_m2"] == pytest.approx(ground, rel=1e-3)


# ---- object-level scores --------------------------------------------------------------------------

def hand_made_objects() -> tuple[np.ndarray, np.ndarray]:
    """Truth: buildings A, B, C. Prediction: A shifted by one pixel (IoU 0.82), B exactly, C missed, and a false D."""
    true = np.zeros((40, 40), dtype=np.uint8)
    pred = np.zeros_like(true)
    true[2:7, 2:12] = 1    # A
    pred[2:7, 3:13] = 1    # A found: IoU 45 / 55 ≥ 0.5
    true[20:30, 20:30] = 1  # B
    pred[20:30, 20:30] = 1  # B found exactly
    true[2:6, 30:34] = 1   # C missed
    pred[33:37, 2:6] = 1   # D false
    return pred, true


def test_object_scores_of_hand_made_masks_are_exact():
    pred, true = hand_made_objects()
    assert match_objects(pred == 1, true == 1) == (2, 3, 3)
    score = ObjectScore("building")
    score.add(pred, true, 1, 255)
    s = score.summary()
    assert (s["found"], s["missed"], s["false"]) == (2, 1, 1)
    assert s["precision"] == s["recall"] == s["f1"] == pytest.approx(2 / 3)
    inter, union = 45 + 100, 55 + 100 + 16 + 16
    assert s["pixel_iou"] == pytest.approx(inter / union)


def test_object_match_needs_half_iou_and_is_one_to_one():
    true = np.zeros((20, 40), dtype=bool)
    true[5:15, 2:12] = True
    true[5:15, 14:24] = True
    merged = np.zeros_like(true)
    merged[5:15, 2:24] = True  # one prediction over both: IoU 100/220 with each, below 0.5
    assert match_objects(merged, true) == (0, 1, 2)
    assert match_objects(merged, true, iou_threshold=0.4) == (1, 1, 2)  # matched to one of them only
    ignore = np.where(true, 1, 255).astype(np.uint8)
    ignore[:, 30:] = 255
    pred = np.zeros_like(ignore)
    pred[0:4, 32:38] = 1  # a prediction where the truth has no label does not count
    score = ObjectScore("building")
    score.add(pred, ignore, 1, 255)
    assert score.summary()["predicted_objects"] == 0


def test_cli_objects_on_chips_with_ground_truth(tmp_path, monkeypatch):
    fake_buildings(monkeypatch)
    pred, true = hand_made_objects()
    image = np.full((40, 40, 3), 40, dtype=np.uint8)
    image[pred == 1, 0] = 220
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "chip.png")
    Image.fromarray(true).save(tmp_path / "masks" / "chip.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / "images"), "--out",
                                      str(tmp_path / "out"), "--device", "cpu", "--tile", "64", "--truth",
                                      str(tmp_path / "masks"), "--objects", "building"])
    assert result.exit_code == 0, result.output
    assert "2 found, 1 missed, 1 false; precision 66.7, recall 66.7, F1 66.7" in result.output
    total = json.loads((tmp_path / "out" / "objects_building.json").read_text())
    assert total["f1"] == pytest.approx(2 / 3) and total["files"] == 1
    per_file = json.loads((tmp_path / "out" / "chip_summary.json").read_text())["objects"]
    assert (per_file["found"], per_file["missed"], per_file["false"]) == (2, 1, 1)


def test_simplify_tolerance_in_map_units_is_the_same_as_in_pixels(tmp_path):
    image = np.full((64, 64, 3), 40, dtype=np.uint8)
    rows, cols = np.mgrid[:64, :64]
    image[(rows - 32) ** 2 + (cols - 30) ** 2 < 20 ** 2, 0] = 220  # a round roof: a staircase outline
    write_geotiff(tmp_path / "site.tif", image, nodata=None)
    layers = {}
    for name, amount in (("px", "3px"), ("map", "1.5"), ("exact", "0")):
        tolerance, in_pixels = parse_amount(amount, "--simplify")
        cfg = PredictConfig(tile=64, force=True, vector=VectorConfig(tmp_path / f"{name}.gpkg", classes=("building",),
                                                                     simplify=tolerance, simplify_in_pixels=in_pixels))
        predict_paths(red_model(), BUILDINGS, [tmp_path / "site.tif"], tmp_path / "out", cfg, progress=False)
        (layers[name],), _ = read_layer(tmp_path / f"{name}.gpkg")
    assert layers["px"]["geometry"].equals(layers["map"]["geometry"])  # 1.5 m at 0.5 m per pixel = 3 px
    exact, simple = layers["exact"]["geometry"], layers["px"]["geometry"]
    assert len(simple.exterior.coords) < len(exact.exterior.coords) / 3
    assert simple.symmetric_difference(exact).area < 0.1 * exact.area


def test_polygonizer_holds_only_the_regions_on_open_seams():
    """400 buildings streamed in 20-row bands and 100-column chunks: at most the buildings along one band row and
    one chunk column are held at a time, and each building comes out once, whole."""
    labels = np.zeros((200, 200), dtype=np.uint8)
    for r in range(0, 200, 10):
        for c in range(0, 200, 10):
            labels[r + 5:r + 12 if r + 12 <= 200 else 200, c + 5:c + 12 if c + 12 <= 200 else 200] = 1
    polygonizer, regions, held = Polygonizer(200, 200, [1]), [], []
    for x in (0, 100):
        for y in range(0, 200, 20):
            regions += polygonizer.add(y, x, labels[y:y + 20, x:x + 100], np.ones((20, 100), np.float32))
            held.append(len(polygonizer.groups))
    assert list(polygonizer.finish()) == [] and not polygonizer.groups and not polygonizer.parent
    assert len(regions) == 400 and sorted({r.pixels for r in regions}) == [25, 35, 49]
    assert max(held) <= 10 + 20  # one band row of buildings (10 per chunk) + one chunk column (20)
