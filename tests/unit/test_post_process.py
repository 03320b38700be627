"""post_process_mask: rembg's ``post_process`` computed in bands of rows, the same bytes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from conftest import SHARED_IMAGES
from deployments.compose import post_process_mask


def masks() -> dict[str, npt.NDArray[np.uint8]]:
    """Soft-edged masks like the model's (the photos' grey levels), and the cases
    where the blur lands on the threshold: a flat 127 field beside 128."""
    out = {p.name: np.asarray(Image.open(p).convert("L")) for p in SHARED_IMAGES}
    edge = np.zeros((300, 217), np.uint8)
    edge[50:250, 40:180] = 127
    edge[100:120] = 128
    out["threshold"] = edge
    out["noise"] = np.random.default_rng(1).integers(0, 256, (123, 77), dtype=np.uint8)
    return out


@pytest.mark.parametrize("name", sorted(masks()))
def test_bands_give_rembgs_bytes(name: str) -> None:
    from rembg.bg import post_process

    mask = masks()[name]
    want = post_process(mask)
    width = mask.shape[1]
    # Bands of 1, 7 and 33 rows (each far thinner than the halo), and one band.
    for band_pixels in (width, 7 * width, 33 * width, mask.size):
        got = post_process_mask(mask, band_pixels)
        assert got.dtype == np.uint8
        assert np.array_equal(got, want), f"{name}, bands of {band_pixels // width} rows"
