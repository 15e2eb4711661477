"""results.png picks tiles that show every class and where the rows disagree most."""
from __future__ import annotations

import numpy as np

from distseg.pipeline.figure import pick_tiles

IGNORE = 255


def hand_made() -> tuple[np.ndarray, list[np.ndarray]]:
    """Six 4×4 tiles with ground truth and two rows of predictions.

    t0 all background, rows agree; t1 background and class 1, agree; t2 all class 1, one row wrong on half the
    tile; t3 background with one pixel of class 2 (the only one), agree; t4 unlabelled but for two pixels that
    a row gets wrong; t5 background, one row wrong on a quarter of the tile.
    """
    masks = np.zeros((6, 4, 4), dtype=np.uint8)
    masks[1, :, 2:] = 1
    masks[2] = 1
    masks[3, 0, 0] = 2
    masks[4] = IGNORE
    masks[4, 0, :2] = 0
    a, b = masks.copy(), masks.copy()
    b[2, :2] = 0
    b[4, 0, :2] = 1
    b[5, 3] = 1
    return masks, [a, b]


def test_every_class_first_then_the_most_disagreement():
    masks, preds = hand_made()
    # classes {0, 1, 2}: t1 shows 0 and 1 (ties with t3, lower index first), t3 adds class 2, then t2 (half wrong)
    assert pick_tiles(masks, preds, 3, IGNORE) == [1, 2, 3]
    # then t5 (a quarter wrong), then t4 (two pixels of 16) before t0, where everything agrees
    assert pick_tiles(masks, preds, 5, IGNORE) == [1, 2, 3, 4, 5]


def test_the_old_rule_would_have_shown_no_rare_class():
    """Fewest ignored pixels (the previous choice) takes t0, t1, t2: class 2 never appears."""
    masks, preds = hand_made()
    old = sorted(np.argsort(-(masks != IGNORE).reshape(6, -1).mean(1), kind="stable")[:3].tolist())
    assert old == [0, 1, 2] and not any((masks[i] == 2).any() for i in old)
    assert any((masks[i] == 2).any() for i in pick_tiles(masks, preds, 3, IGNORE))


def test_fewer_candidates_than_tiles_and_a_single_row():
    masks, preds = hand_made()
    assert pick_tiles(masks[:2], [p[:2] for p in preds], 4, IGNORE) == [0, 1]
    assert pick_tiles(masks, preds[1:], 1, IGNORE) == [1]
