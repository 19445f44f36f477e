"""Image grids: plain and labelled layouts place every image where it belongs and write its label."""
import numpy as np
import pytest

import engine
from engine.images import labelled_grid, make_grid


def _images(n, h=4, w=3, c=1, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=(n, h, w, c)).astype(np.float32)


def _cell(grid, row, col, h, w, padding, scale, origin=(0, 0)):
    y = origin[1] + (padding + row * (h + padding)) * scale
    x = origin[0] + (padding + col * (w + padding)) * scale
    return np.asarray(grid)[y:y + h * scale:scale, x:x + w * scale:scale]


def test_make_grid_places_images_row_major():
    images = _images(5)
    grid = make_grid(images, nrow=3, padding=1, scale=2)
    assert grid.size == ((3 * 4 + 1) * 2, (2 * 5 + 1) * 2)
    for k in range(5):
        r, c = divmod(k, 3)
        got = _cell(grid, r, c, 4, 3, 1, 2)
        assert np.abs(got.astype(int) - np.round(images[k, ..., 0] * 255)).max() <= 1


def test_labelled_grid_one_per_class_is_one_row_with_labels_above():
    images = _images(4)
    grid = labelled_grid(images, [7, 3, 1, 0], scale=8)
    plain = make_grid(images, nrow=4, scale=8)
    top = grid.height - plain.height
    assert grid.width == plain.width and top > 0
    assert np.array_equal(np.asarray(grid)[top:], np.asarray(plain))
    strip = np.asarray(grid)[:top]
    cell_w = (3 + 2) * 8
    for k in range(4):  # some dark text above each image, nothing else in the strip
        assert (strip[:, k * cell_w:(k + 1) * cell_w] < 128).any()


def test_labelled_grid_one_per_class_wraps_after_ten():
    images = _images(12)
    grid = np.asarray(labelled_grid(images, list(range(12)), scale=2))
    first = make_grid(images[:10], nrow=10, scale=2)
    band = (grid.shape[0] - 2 * first.height) // 2
    assert grid.shape[1] == first.width and band > 0
    assert np.array_equal(grid[band:band + first.height], np.asarray(first))
    second = _cell(grid, 0, 1, 4, 3, 2, 2, origin=(0, 2 * band + first.height))
    assert np.abs(second.astype(int) - np.round(images[11, ..., 0] * 255)).max() <= 1
    # Labels only above the images that exist; the rest of the second row stays white.
    assert (grid[first.height + band:, 3 * 5 * 2:] == 255).all()


def test_labelled_grid_rows_per_class_with_labels_left():
    images = _images(5, c=3)
    labels = [2, 2, 9, 9, 9]
    grid = labelled_grid(images, labels, scale=4)
    assert grid.mode == "RGB"
    plain_w = (3 * (3 + 2) + 2) * 4
    left = grid.width - plain_w
    assert left > 0 and grid.height == (2 * (4 + 2) + 2) * 4
    arr = np.asarray(grid)
    # Row of class 9 holds images 2, 3, 4; the short row of class 2 is padded with black.
    for col, k in enumerate([2, 3, 4]):
        got = _cell(arr, 1, col, 4, 3, 2, 4, origin=(left, 0))
        assert np.abs(got.astype(int) - np.round(images[k] * 255)).max() <= 1
    assert (_cell(arr, 0, 2, 4, 3, 2, 4, origin=(left, 0)) == 0).all()
    for row in range(2):
        band = arr[(2 + row * 6) * 4:(2 + row * 6 + 4) * 4, :left]
        assert (band < 128).any()


def test_labelled_grid_rejects_mismatched_labels():
    with pytest.raises(engine.SamplingError, match="3 images but 2 labels"):
        labelled_grid(_images(3), [0, 1])
