"""Mask -> RLE encoders against pycocotools.mask.encode called mask by mask (byte-identical counts)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from diffusioninst.evaluation import encode_masks, encode_masks_cropped, encode_masks_dense


def reference(masks: np.ndarray) -> list[str]:
    return [
        mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]["counts"].decode("ascii") for m in masks
    ]


def edge_case_masks(h: int, w: int) -> np.ndarray:
    m = np.zeros((10, h, w), bool)
    m[1] = True  # full image
    m[2, 0, 0] = m[2, -1, -1] = True  # first and last pixel
    m[3, :, 3:6] = True  # full-height band: runs continue across columns
    m[4, :, 2 % w] = True
    m[4, : h // 2, 3 % w] = True
    m[4, h // 2 :, 5 % w] = True
    m[5, -1, :] = True  # bottom row
    m[6, :, -1] = True  # last column
    m[7, 1:-1, 1:-1] = True  # everything but the border
    m[8, ::2, ::3] = True  # checkerboard-like
    return m  # m[0] stays empty


@pytest.mark.parametrize("encoder", [encode_masks_cropped, encode_masks_dense, encode_masks])
def test_encoders_match_pycocotools_byte_for_byte(encoder):
    rng = np.random.default_rng(0)
    cases = [edge_case_masks(17, 23), edge_case_masks(1, 9), edge_case_masks(9, 1)]
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        density = rng.random()
        cases.append(rng.random((int(rng.integers(1, 6)), h, w)) < density)
        blobs = np.zeros((3, h, w), bool)  # compact blobs, the usual detector output
        for b in blobs:
            y, x = rng.integers(0, h), rng.integers(0, w)
            b[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = True
        cases.append(blobs)
    for masks in cases:
        rles = encoder(masks)
        assert [r["counts"] for r in rles] == reference(masks)
        assert all(r["size"] == list(masks.shape[1:]) for r in rles)
        assert all(isinstance(r["counts"], str) for r in rles)


def test_auto_takes_both_paths_and_accepts_integer_masks():
    small = np.zeros((4, 60, 80), np.uint8)
    small[:, 10:20, 30:35] = 1
    large = np.ones((2, 60, 80), bool)
    for masks in (small, large):
        assert [r["counts"] for r in encode_masks(masks)] == reference(masks != 0)
    assert encode_masks(np.zeros((0, 5, 5), bool)) == []
    with pytest.raises(ValueError, match=r"\[M, H, W\]"):
        encode_masks(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="method"):
        encode_masks(small, method="fast")
