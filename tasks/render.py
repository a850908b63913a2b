"""Draw retrieval contexts as images: coloured shapes at random, non-overlapping places.

Pure and seeded (numpy only). The pieces:

- :func:`palette` - ``n`` well-separated RGB colours (the full 6x6x6 cube for 216 colours).
- :class:`ShapeBank` - ``n`` procedurally generated shapes (polygons, stars, crosses, ellipses,
  each optionally rotated, stretched or with a hole), chosen greedily from a candidate pool to be
  as different as possible *at the configured object size*; a size too small to keep them apart
  is refused with :class:`TaskConfigError`.
- :class:`Renderer` - places ``n_objects`` square object boxes at random (non-overlapping, with a
  gap), draws each shape's anti-aliased mask in its colour, and returns an ``HxWx3`` uint8 image.

Object identity (colour, shape) is independent of position: the same shape is drawn with the
same mask wherever it lands (positions are whole pixels), which is what makes the image context
translation invariant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tasks.protocol import TaskConfigError

SUPERSAMPLE = 4          # sub-pixel samples per axis when rasterising masks
_PLACE_TRIES = 200       # random placement attempts per object before falling back to a jittered grid


# ---------------------------------------------------------------------------------------- colours
@lru_cache(maxsize=32)
def palette(n_colors: int, background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """``n_colors`` distinct RGB colours as a read-only [n, 3] uint8 array.

    Colours come from an L x L x L cube of channel levels (L = 6 for up to 216 colours, the
    paper's palette). With fewer colours than the cube holds, they are picked by farthest-point
    sampling, so small palettes are well separated. The level ``0`` is never used, so no colour
    equals the (default black) background.
    """
    if n_colors < 1:
        raise TaskConfigError(f"need at least one colour, got n_colors={n_colors}")
    levels_per_channel = max(6, math.ceil(n_colors ** (1 / 3)))
    levels = np.round(np.linspace(255 / levels_per_channel, 255, levels_per_channel)).astype(int)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    cube = cube[np.any(cube != np.asarray(background), axis=1)]
    if n_colors > len(cube):  # pragma: no cover - cube always holds >= n_colors
        raise TaskConfigError(f"cannot make {n_colors} distinct colours")
    if n_colors == len(cube):
        chosen = np.arange(len(cube))
    else:
        # Farthest-point sampling from the brightest-red corner (deterministic).
        chosen = [int(np.argmax(cube[:, 0] * 4 - cube[:, 1] - cube[:, 2]))]
        dist = np.linalg.norm(cube - cube[chosen[0]], axis=1)
        dist = np.minimum(dist, np.linalg.norm(cube - np.asarray(background), axis=1))
        for _ in range(n_colors - 1):
            nxt = int(np.argmax(dist))
            chosen.append(nxt)
            dist = np.minimum(dist, np.linalg.norm(cube - cube[nxt], axis=1))
    colours = cube[np.asarray(chosen)].astype(np.uint8)
    colours.setflags(write=False)
    return colours


# ----------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ShapeSpec:
    """A shape before rasterisation: a base outline plus transformations."""

    kind: str              # polygon | star | cross | ellipse
    k: int = 0             # vertices / points
    rotation: float = 0.0  # radians
    aspect: float = 1.0    # y-scale (stretch), applied before rotation
    hole: bool = False     # cut a scaled copy of the outline out of the middle
    inner: float = 0.45    # star: inner radius / outer radius

    def rings(self) -> list[np.ndarray]:
        """Closed outlines [(n, 2) arrays, unit-disc coordinates]; the even-odd rule fills them."""
        if self.kind == "polygon":
            t = np.arange(self.k) * 2 * np.pi / self.k + np.pi / 2
            pts = np.stack([np.cos(t), np.sin(t)], 1)
        elif self.kind == "star":
            t = np.arange(2 * self.k) * np.pi / self.k + np.pi / 2
            r = np.where(np.arange(2 * self.k) % 2 == 0, 1.0, self.inner)
            pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        elif self.kind == "cross":
            a = 0.33
            pts = np.array([[a, 1], [a, a], [1, a], [1, -a], [a, -a], [a, -1],
                            [-a, -1], [-a, -a], [-1, -a], [-1, a], [-a, a], [-a, 1]], float)
        elif self.kind == "ellipse":
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            pts = np.stack([np.cos(t), np.sin(t)], 1)
        else:  # pragma: no cover - specs come from _candidates
            raise ValueError(self.kind)
        pts = pts * np.array([1.0, self.aspect])
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        pts = pts @ np.array([[c, s], [-s, c]])
        pts = pts / np.abs(pts).max()  # fill the box
        rings = [pts]
        if self.hole:
            rings.append(pts * 0.45)
        return rings

    @property
    def name(self) -> str:
        bits = [self.kind + (str(self.k) if self.k else "")]
        if self.kind == "star" and self.inner != 0.45:
            bits.append(f"i{self.inner:g}")
        if self.aspect != 1.0:
            bits.append(f"x{self.aspect:g}")
        if self.rotation:
            bits.append(f"r{round(math.degrees(self.rotation))}")
        if self.hole:
            bits.append("ring")
        return "-".join(bits)


def _candidates() -> list[ShapeSpec]:
    """A deterministic pool of candidate shapes (a few hundred)."""
    bases = [("ellipse", 0, 0.45)] + [("polygon", k, 0.45) for k in range(3, 9)] + [("cross", 0, 0.45)]
    bases += [("star", k, inner) for inner in (0.45, 0.7) for k in range(4, 9)]
    out = []
    for hole in (False, True):
        for aspect in (1.0, 0.55, 0.78):
            for kind, k, inner in bases:
                period = 2 * np.pi / k if k else (np.pi / 2 if kind == "cross" else np.pi)
                if kind == "ellipse" and aspect == 1.0:
                    rotations = [0.0]
                elif aspect == 1.0:
                    rotations = [0.0, period / 2]
                else:
                    rotations = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
                for rot in rotations:
                    out.append(ShapeSpec(kind, k, float(rot), aspect, hole, inner))
    return out


def _inside(rings: list[np.ndarray], xy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for points ``xy`` [N, 2] against closed ``rings``."""
    inside = np.zeros(len(xy), dtype=bool)
    x, y = xy[:, 0:1], xy[:, 1:2]
    for ring in rings:
        x0, y0 = ring[:, 0], ring[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= (np.sum(crosses & (x < xc), axis=1) % 2).astype(bool)
    return inside


def rasterize(spec: ShapeSpec, size: int) -> np.ndarray:
    """Anti-aliased coverage mask [size, size] float32 in [0, 1] of a shape filling the box."""
    n = size * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / n * 2 - 1                 # sub-pixel centres in [-1, 1]
    xs, ys = np.meshgrid(centres, -centres)                   # y up
    inside = _inside(spec.rings(), np.stack([xs.ravel(), ys.ravel()], 1) * 1.02)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def mask_distance(a: np.ndarray, b: np.ndarray, shift: int = 1) -> np.ndarray:
    """Mean absolute difference between masks, minimised over shifts of up to ``shift`` pixels.

    ``a`` is [size, size]; ``b`` is [..., size, size]; returns [...]. Shift tolerance means two
    shapes only count as different if no small misalignment makes them agree.
    """
    size = a.shape[-1]
    pad = np.pad(a, shift)
    best = None
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            shifted = pad[shift + dy : shift + dy + size, shift + dx : shift + dx + size]
            d = np.abs(b - shifted).mean(axis=(-2, -1))
            best = d if best is None else np.minimum(best, d)
    return best


class ShapeBank:
    """``n_shapes`` mutually distinct shapes rasterised at ``size`` pixels.

    Shapes are chosen greedily (farthest-point) from the candidate pool using the shift-tolerant
    mask distance at this size; if the closest pair differs by less than ``min_difference``
    (mean absolute mask difference over the box), the size is refused.
    """

    def __init__(self, n_shapes: int, size: int, min_difference: float = 0.06) -> None:
        self.n_shapes, self.size, self.min_difference = int(n_shapes), int(size), float(min_difference)
        specs, masks, self.min_distance = _select_shapes(self.n_shapes, self.size)
        self.specs, self.masks = specs, masks
        if self.min_distance < self.min_difference:
            raise TaskConfigError(
                f"{self.n_shapes} shapes cannot be kept distinct at object_size={self.size}px: the closest pair "
                f"differs by {self.min_distance:.3f} < min_shape_difference={self.min_difference} "
                "(mean |mask difference|); raise render.object_size (and canvas_size) or lower task.n_shapes"
            )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


@lru_cache(maxsize=16)
def _select_shapes(n_shapes: int, size: int) -> tuple[list[ShapeSpec], np.ndarray, float]:
    if n_shapes < 1:
        raise TaskConfigError(f"need at least one shape, got n_shapes={n_shapes}")
    if size < 4:
        raise TaskConfigError(f"render.object_size must be >= 4 px, got {size}")
    pool = _candidates()
    if n_shapes > len(pool):
        raise TaskConfigError(f"the shape generator offers {len(pool)} shapes; task.n_shapes={n_shapes} is too many")
    masks = np.stack([rasterize(s, size) for s in pool])
    # Drop outlines too thin to read at this size: each shape needs a solid core and some area.
    solid = (masks >= 0.99).sum(axis=(1, 2))
    keep = np.flatnonzero((solid >= max(2, size * size // 25)) & (masks.mean(axis=(1, 2)) >= 0.2))
    pool, masks = [pool[i] for i in keep], masks[keep]
    if n_shapes > len(pool):
        raise TaskConfigError(
            f"only {len(pool)} generated shapes stay legible at object_size={size}px; task.n_shapes={n_shapes} "
            "needs larger objects (raise render.object_size) or fewer shapes"
        )
    chosen = [0]
    dist = mask_distance(masks[0], masks)
    dist[0] = -1
    for _ in range(n_shapes - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, mask_distance(masks[nxt], masks))
        dist[chosen] = -1
    sel = masks[chosen]
    sel.setflags(write=False)
    min_d = min(
        (float(mask_distance(sel[i], sel[i + 1 :]).min()) for i in range(n_shapes - 1)), default=float("inf")
    )
    return [pool[i] for i in chosen], sel, min_d


# ------------------------------------------------------------------------------------- rendering
@dataclass
class Layout:
    """Where each object of a context is drawn: top-left corner (row, col) of its box, in px."""

    corners: list[tuple[int, int]]
    size: int

    def centres(self) -> list[tuple[float, float]]:
        half = self.size / 2
        return [(r + half, c + half) for r, c in self.corners]


class Renderer:
    """Draws (colours, shapes) contexts on a ``canvas_size`` square canvas.

    Each object fills an ``object_size`` square box; boxes never overlap and keep ``gap`` pixels
    between each other (they may touch the canvas border). ``max_objects`` is checked up front:
    if that many boxes cannot be guaranteed to fit, :class:`TaskConfigError` is raised at once.
    """

    def __init__(
        self,
        n_colors: int,
        n_shapes: int,
        canvas_size: int = 48,
        object_size: int = 10,
        gap: int = 2,
        max_objects: int = 1,
        background=(0, 0, 0),
        min_shape_difference: float = 0.06,
    ) -> None:
        self.canvas_size, self.object_size, self.gap = int(canvas_size), int(object_size), int(gap)
        self.background = tuple(int(v) for v in background)
        if len(self.background) != 3:
            raise TaskConfigError(f"render.background must be an RGB triple, got {background!r}")
        if self.gap < 0 or self.object_size < 1 or self.canvas_size < 1:
            raise TaskConfigError("render sizes must be positive (and render.gap >= 0)")
        self.capacity = self.grid_cells ** 2
        if max_objects > self.capacity:
            raise TaskConfigError(
                f"a {self.canvas_size}px canvas holds at most {self.capacity} non-overlapping objects of "
                f"{self.object_size}px (gap {self.gap}px), but up to {max_objects} are requested; raise "
                f"render.canvas_size (to >= {self.min_canvas(max_objects)}), lower render.object_size, or lower the "
                "task's object counts"
            )
        self.max_objects = int(max_objects)
        self.colours = palette(int(n_colors), self.background)
        self.shapes = ShapeBank(int(n_shapes), self.object_size, min_shape_difference)

    @property
    def cell(self) -> int:
        return self.object_size + self.gap

    @property
    def grid_cells(self) -> int:
        """Boxes per side of the fallback grid (guaranteed placements)."""
        return max(0, (self.canvas_size + self.gap) // self.cell)

    def min_canvas(self, n_objects: int) -> int:
        return math.ceil(math.sqrt(n_objects)) * self.cell - self.gap

    def layout(self, rng: np.random.Generator, n_objects: int) -> Layout:
        """Random non-overlapping box corners for ``n_objects`` objects."""
        if n_objects > self.capacity:
            raise TaskConfigError(f"{n_objects} objects do not fit on the canvas (capacity {self.capacity})")
        lo, hi = 0, self.canvas_size - self.object_size  # inclusive corner range
        placed = np.empty((0, 2), np.int64)
        for _ in range(n_objects):
            tries = rng.integers(lo, hi + 1, (_PLACE_TRIES, 2))   # candidate corners, tried in order
            apart = (np.abs(tries[:, None, :] - placed[None]) >= self.cell).any(-1).all(-1)
            first = int(np.argmax(apart))
            if not apart[first]:
                return self._grid_layout(rng, n_objects)
            placed = np.vstack([placed, tries[first]])
        return Layout([(int(r), int(c)) for r, c in placed], self.object_size)

    def _grid_layout(self, rng: np.random.Generator, n_objects: int) -> Layout:
        """Dense fallback: random cells of the grid, each box jittered within the leftover margin."""
        g = self.grid_cells
        slack = self.canvas_size + self.gap - g * self.cell   # spare pixels beyond the grid
        offset = rng.integers(0, slack + 1, 2) if slack > 0 else np.zeros(2, int)
        cells = rng.choice(g * g, n_objects, replace=False)
        corners = [(int(offset[0] + (i // g) * self.cell), int(offset[1] + (i % g) * self.cell))
                   for i in cells]
        return Layout(corners, self.object_size)

    def draw(self, colors, shapes, layout: Layout) -> np.ndarray:
        """The image [H, W, 3] uint8 of objects ``(colors[i], shapes[i])`` at ``layout``."""
        size = self.object_size
        canvas = np.empty((self.canvas_size, self.canvas_size, 3), np.float32)
        canvas[:] = self.background
        for colour, shape, (r, c) in zip(colors, shapes, layout.corners):
            alpha = self.shapes.masks[shape][..., None]
            box = canvas[r : r + size, c : c + size]
            box[:] = box * (1 - alpha) + self.colours[colour].astype(np.float32) * alpha
        return np.round(canvas).astype(np.uint8)

    def render(self, rng: np.random.Generator, colors, shapes) -> tuple[np.ndarray, Layout]:
        """Lay out and draw one context; returns (image, layout)."""
        layout = self.layout(rng, len(colors))
        return self.draw(colors, shapes, layout), layout
