"""Fused on-device ops of the mean-teacher step: the EMA update and pseudo-labelling."""
from distseg.ops.ema import EMA, ema_update_, ema_update_reference_
from distseg.ops.pseudo import PseudoLabels, pseudo_label, pseudo_label_reference, tta_probs

__all__ = [
    "EMA",
    "PseudoLabels",
    "ema_update_",
    "ema_update_reference_",
    "pseudo_label",
    "pseudo_label_reference",
    "tta_probs",
]
