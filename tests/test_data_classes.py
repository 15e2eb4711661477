"""ClassMap: parsing, validation errors, mask encoding, equality and round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest

from distseg.data.classes import ClassMap
from distseg.data.errors import DataError

SPEC = {
    "ignore_index": 255,
    "classes": [
        {"name": "building", "index": 0, "color": [60, 16, 152]},
        {"name": "road", "index": 1, "value": 3, "color": [110, 193, 228]},
        {"name": "unlabeled", "color": [155, 155, 155], "value": 9, "ignore": True},
    ],
}


def test_views_and_round_trip(tmp_path):
    cm = ClassMap.from_dict(SPEC)
    assert cm.num_classes == 2 and cm.names == ["building", "road"] and cm.ignore_index == 255
    assert cm.colors == [(60, 16, 152), (110, 193, 228)]
    assert cm.to_dict() == SPEC
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cm.to_dict()))
    assert ClassMap.from_file(path).to_dict() == SPEC


def test_yaml_without_indices_uses_file_order_and_palette(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classes:\n  - {name: a, value: 7}\n  - {name: skip, value: 0, ignore: true}\n"
                    "  - {name: b, value: 1}\n  - {name: a, value: 8}\n")
    cm = ClassMap.from_file(path)
    assert cm.names == ["a", "b"]
    assert cm.encode(np.array([[7, 8, 1, 0]]), path).tolist() == [[0, 0, 1, 255]]
    assert len(set(cm.colors)) == 2 and cm.colors == ClassMap.from_file(path).colors


def test_equality_ignores_colours_but_not_names_or_ignore_index():
    cm = ClassMap.from_dict(SPEC)
    recoloured = json.loads(json.dumps(SPEC))
    recoloured["classes"][0]["color"] = [1, 2, 3]
    assert ClassMap.from_dict(recoloured) == cm
    renamed = json.loads(json.dumps(SPEC))
    renamed["classes"][1]["name"] = "track"
    assert ClassMap.from_dict(renamed) != cm
    other_ignore = dict(SPEC, ignore_index=254)
    assert ClassMap.from_dict(other_ignore) != cm


def test_encode_rgb_index_and_unknown():
    cm = ClassMap.from_dict(SPEC)
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0] = (60, 16, 152)
    rgb[1] = (110, 193, 228)
    rgb[1, 2] = (155, 155, 155)
    assert cm.encode(rgb, "m.png").tolist() == [[0, 0, 0], [1, 1, 255]]
    assert cm.encode(np.array([[3, 9]]), "m.png").tolist() == [[1, 255]]
    rgb[0, :2] = (7, 7, 7)
    with pytest.raises(DataError, match=r"m\.png: mask has colour \(7, 7, 7\) \(2 px\) not in the class map"):
        cm.encode(rgb, "m.png")
    assert cm.encode(rgb, "m.png", unknown="ignore")[0].tolist() == [255, 255, 0]
    with pytest.raises(DataError, match=r"value 4 \(1 px\)"):
        cm.encode(np.array([[3, 4]]), "m.png")


@pytest.mark.parametrize("text, message", [
    ("classes: [", "malformed class map"),
    ("classes: []", "non-empty list"),
    ("classes:\n  - {name: a}", "needs a 'color'"),
    ("classes:\n  - {name: a, index: 0, value: 1}\n  - {name: b, index: 2, value: 2}", "without gaps"),
    ("classes:\n  - {name: a, index: 0, value: 1}\n  - {name: b, value: 2}", "every training class or for none"),
    ("classes:\n  - {name: a, value: 1}\n  - {name: b, value: 1}", "value 1 is given to both"),
    ("classes:\n  - {name: a, color: [1, 2]}", "color must be"),
    ("classes:\n  - {name: a, value: 1, colour: [1, 2, 3]}", "unknown key"),
    ("ignore_index: 0\nclasses:\n  - {name: a, value: 1}", "collides"),
])
def test_malformed_class_maps_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        ClassMap.from_file(path)
    assert str(path) in str(err.value)


def test_single_channel_mask_with_colour_only_map_is_an_error():
    cm = ClassMap.from_dict({"classes": [{"name": "a", "color": [1, 2, 3]}]})
    with pytest.raises(DataError, match="single-channel mask"):
        cm.encode(np.zeros((2, 2), dtype=np.uint8), "x.png")
