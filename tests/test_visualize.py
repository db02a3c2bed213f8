"""Overlay drawing: which detections are drawn, and the mask blend."""

import numpy as np
import torch

from diffusioninst.engine.visualize import draw_overlay, palette


def _result():
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [40.0, 4.0, 56.0, 20.0], [4.0, 40.0, 20.0, 56.0]])
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 8:16, 8:16] = True
    masks[1, 8:16, 44:52] = True
    masks[2, 44:52, 8:16] = True
    return {"boxes": boxes, "scores": torch.tensor([0.5, 0.9, 0.2]), "labels": torch.tensor([0, 1, 2]), "masks": masks}


def test_overlay_draws_the_best_detections_above_the_threshold():
    image = np.zeros((64, 64, 3), np.uint8)
    out = np.asarray(draw_overlay(image, _result(), ["a", "b", "c"], score_threshold=0.3, alpha=0.5, max_detections=1))
    # only detection 1 (score 0.9): its mask interior is the first palette colour blended 50/50 with black
    expected = (np.asarray(palette(1)[0], np.float32) * 0.5).astype(np.uint8)
    assert (out[12:16, 46:50] == expected).all()
    assert (out[12:16, 10:14] == 0).all()  # 0.5 is above the threshold but over max_detections
    assert (out[46:50, 10:14] == 0).all()  # 0.2 is below the threshold
    out = np.asarray(draw_overlay(image, _result(), None, score_threshold=0.3))
    assert out[12:16, 10:14].any() and out[12:16, 46:50].any() and not out[46:50, 10:14].any()
