"""Renderer: determinism, non-overlap, distinct colours and shapes, capacity checks."""
import numpy as np
import pytest

from tasks.render import Renderer, ShapeBank, mask_distance, palette
from tasks.protocol import TaskConfigError


@pytest.fixture(scope="module")
def renderer():
    return Renderer(n_colors=24, n_shapes=24, canvas_size=48, object_size=10, gap=2, max_objects=16)


def _draw(renderer, seed, n):
    rng = np.random.default_rng(seed)
    colors = rng.choice(24, n, replace=False)
    shapes = rng.choice(24, n, replace=False)
    return renderer.render(rng, colors, shapes)


def test_deterministic(renderer):
    a, la = _draw(renderer, 7, 6)
    b, lb = _draw(renderer, 7, 6)
    c, _ = _draw(renderer, 8, 6)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la.corners == lb.corners
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("n", [1, 2, 8, 9, 12, 16])
def test_boxes_inside_and_apart(renderer, n):
    for seed in range(20):
        _, layout = _draw(renderer, seed, n)
        assert len(layout.corners) == n
        for i, (r, c) in enumerate(layout.corners):
            assert 0 <= r <= 48 - 10 and 0 <= c <= 48 - 10
            for r2, c2 in layout.corners[i + 1 :]:  # separated by at least the gap on one axis
                assert abs(r - r2) >= 12 or abs(c - c2) >= 12


def test_objects_drawn_in_their_colour(renderer):
    rng = np.random.default_rng(3)
    colors, shapes = [0, 5, 9], [1, 2, 3]
    image, layout = renderer.render(rng, colors, shapes)
    for colour, shape, (r, c) in zip(colors, shapes, layout.corners):
        box = image[r : r + 10, c : c + 10]
        full = renderer.shapes.masks[shape] > 0.999
        assert full.any()
        assert (box[full] == renderer.colours[colour]).all()
    covered = np.zeros((48, 48), bool)
    for r, c in layout.corners:
        covered[r : r + 10, c : c + 10] = True
    assert (image[~covered] == 0).all()  # background elsewhere


@pytest.mark.parametrize("n", [6, 24, 216])
def test_palette_distinct(n):
    cols = palette(n).astype(int)
    assert len({tuple(c) for c in cols}) == n
    assert not any((c == 0).all() for c in cols)  # never the black background
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(n) * 1e9
    assert d.min() >= 40  # a 6-level cube step is 42.5


@pytest.mark.parametrize("n,size", [(24, 10), (24, 12), (16, 8)])
def test_shape_masks_differ_by_margin(n, size):
    bank = ShapeBank(n, size)
    margin = 0.06  # mean |mask difference| over the box, minimised over 1px shifts
    for i in range(n):
        d = mask_distance(bank.masks[i], bank.masks[i + 1 :])
        assert (d >= margin).all(), (bank.names[i], d.min())
    assert len(set(bank.names)) == n


@pytest.mark.slow
def test_paper_scale_shapes_distinct():
    bank = ShapeBank(216, 40)
    assert bank.min_distance >= 0.06


def test_too_small_canvas_refused():
    with pytest.raises(TaskConfigError, match="canvas holds at most 9"):
        Renderer(24, 24, canvas_size=40, object_size=10, gap=2, max_objects=16)


def test_too_small_objects_refused():
    with pytest.raises(TaskConfigError, match="cannot be kept distinct"):
        ShapeBank(150, 5)
