"""World geometry: 3-D vectors, half-open boxes and a regular grid of cells. Pure, no I/O.

Conventions (docs/world.md has figures):

* A `Box` is **half-open** on every axis, ``[min, max)``: a point on a face shared by two boxes
  belongs to exactly one of them, the one whose *min* face it lies on.
* `Box.signed_distance` is **positive inside**: the distance to the nearest face for a point in the
  closed box (0 exactly on the boundary), and minus the Euclidean distance to the box for a point
  outside it. So ``sd > 0`` implies `Box.contains`, ``sd < 0`` implies not, and `Box.contains`
  implies ``sd >= 0`` (a point on a *max* face has ``sd == 0`` and is not contained).
* A `Grid` cuts space into cells ``[origin + c * size, origin + (c + 1) * size)`` per axis. The cell
  of a point is ``floor((p - origin) / size)`` per axis, corrected so that it always agrees with
  `Grid.cell_box` bit for bit (floating-point division alone can be one cell off next to a face).
  A cell's centre is ``origin + (c + 0.5) * size``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Protocol

import attrs

__all__ = ["HORIZON_Z_SIZE", "Box", "Cell", "Grid", "Vec3"]

#: Height (z extent) of a Horizon region: Horizon's default region is z in [-100, 100], while the
#: ``bounds`` it registers is the half-extent on x only.
HORIZON_Z_SIZE = 200.0

# Cells further than this from the first guess are not searched: past it the grid's cells are too
# thin to be told apart in floating point (see `Grid.cell_of`).
_MAX_CORRECTION = 4


class _Point(Protocol):
    """Anything with x, y, z numbers (`Vec3`, Horizon's ``WorldPoint``)."""

    @property
    def x(self) -> float: ...
    @property
    def y(self) -> float: ...
    @property
    def z(self) -> float: ...


class _IntPoint(Protocol):
    """Anything with x, y, z integers (`Cell`, Horizon's ``RegionCoord``)."""

    @property
    def x(self) -> int: ...
    @property
    def y(self) -> int: ...
    @property
    def z(self) -> int: ...


@attrs.frozen
class Vec3:
    """A point or a vector in world coordinates."""

    x: float
    y: float
    z: float

    ZERO: ClassVar[Vec3]

    @classmethod
    def splat(cls, value: float) -> Vec3:
        """``Vec3(value, value, value)``."""
        return cls(value, value, value)

    @classmethod
    def of(cls, point: _Point) -> Vec3:
        """A `Vec3` from anything with ``x``, ``y`` and ``z`` (Horizon's ``WorldPoint``)."""
        return cls(float(point.x), float(point.y), float(point.z))

    def __add__(self, other: Vec3) -> Vec3:
        return Vec3(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other: Vec3) -> Vec3:
        return Vec3(self.x - other.x, self.y - other.y, self.z - other.z)

    def __neg__(self) -> Vec3:
        return Vec3(-self.x, -self.y, -self.z)

    def scale(self, factor: float) -> Vec3:
        """The vector times a number."""
        return Vec3(self.x * factor, self.y * factor, self.z * factor)

    def mul(self, other: Vec3) -> Vec3:
        """The component-wise product."""
        return Vec3(self.x * other.x, self.y * other.y, self.z * other.z)

    def dot(self, other: Vec3) -> float:
        """The dot product."""
        return self.x * other.x + self.y * other.y + self.z * other.z

    def length(self) -> float:
        """The Euclidean length (`math.hypot`: no overflow or underflow in the squares)."""
        return math.hypot(self.x, self.y, self.z)

    def is_finite(self) -> bool:
        """Whether no component is infinite or NaN."""
        return math.isfinite(self.x) and math.isfinite(self.y) and math.isfinite(self.z)

    def as_tuple(self) -> tuple[float, float, float]:
        """``(x, y, z)``."""
        return (self.x, self.y, self.z)


Vec3.ZERO = Vec3(0.0, 0.0, 0.0)


class Cell(NamedTuple):
    """The integer coordinates of a grid cell (Horizon's ``region_coord``)."""

    x: int
    y: int
    z: int

    @classmethod
    def of(cls, coord: _IntPoint) -> Cell:
        """A `Cell` from anything with integer ``x``, ``y`` and ``z`` (Horizon's ``RegionCoord``)."""
        return cls(coord.x, coord.y, coord.z)

    def is_adjacent(self, other: Cell) -> bool:
        """Whether ``other`` is one of the 6 face neighbours of this cell."""
        return abs(self.x - other.x) + abs(self.y - other.y) + abs(self.z - other.z) == 1


def _finite_vec(_instance: object, attribute: attrs.Attribute[Vec3], value: Vec3) -> None:
    if not value.is_finite():
        raise ValueError(f"{attribute.name} must be finite, got {value.as_tuple()}")


@attrs.frozen
class Box:
    """An axis-aligned box, half-open on every axis: ``min <= p < max``.

    ``min`` and ``max`` are finite and ``min < max`` on every axis.
    """

    min: Vec3 = attrs.field(validator=_finite_vec)
    max: Vec3 = attrs.field(validator=_finite_vec)

    @max.validator
    def _check_order(self, _attribute: attrs.Attribute[Vec3], value: Vec3) -> None:
        lo = self.min
        if not (lo.x < value.x and lo.y < value.y and lo.z < value.z):
            raise ValueError(
                f"min must be below max on every axis, got {lo.as_tuple()} .. {value.as_tuple()}"
            )

    @classmethod
    def from_center(cls, center: Vec3, half_extent: Vec3) -> Box:
        """The box ``[center - half_extent, center + half_extent)``."""
        return cls(center - half_extent, center + half_extent)

    @property
    def center(self) -> Vec3:
        """The middle of the box."""
        return (self.min + self.max).scale(0.5)

    @property
    def size(self) -> Vec3:
        """``max - min``."""
        return self.max - self.min

    @property
    def half_extent(self) -> Vec3:
        """Half the size on every axis."""
        return self.size.scale(0.5)

    def contains(self, p: Vec3) -> bool:
        """Whether ``min <= p < max`` on every axis (the max faces are outside)."""
        lo, hi = self.min, self.max
        return lo.x <= p.x < hi.x and lo.y <= p.y < hi.y and lo.z <= p.z < hi.z

    def intersects(self, other: Box) -> bool:
        """Whether the two boxes share some volume (sharing a face or an edge is not enough)."""
        a, b = self, other
        return (
            a.min.x < b.max.x
            and b.min.x < a.max.x
            and a.min.y < b.max.y
            and b.min.y < a.max.y
            and a.min.z < b.max.z
            and b.min.z < a.max.z
        )

    def signed_distance(self, p: Vec3) -> float:
        """Signed distance from ``p`` to the boundary of the box, positive inside.

        * ``p`` in the open box: the distance to the nearest face, > 0;
        * ``p`` on the boundary (any face, the max faces included): exactly 0.0;
        * ``p`` outside the closed box: minus the Euclidean distance to the box, < 0.

        So ``signed_distance(p) > 0`` implies ``contains(p)``, ``< 0`` implies not, and
        ``contains(p)`` implies ``>= 0``. The result is 1-Lipschitz in ``p``.
        """
        lo, hi = self.min, self.max
        # How far p is outside each slab: > 0 outside, <= 0 inside (minus the distance to the
        # nearer of the two faces). Differences of floats keep their sign exactly.
        ox = max(lo.x - p.x, p.x - hi.x)
        oy = max(lo.y - p.y, p.y - hi.y)
        oz = max(lo.z - p.z, p.z - hi.z)
        if ox <= 0.0 and oy <= 0.0 and oz <= 0.0:
            return -max(ox, oy, oz) + 0.0  # + 0.0 turns -0.0 into 0.0 on the boundary
        # hypot scales before squaring: a tiny positive gap never underflows to 0.
        return -math.hypot(max(ox, 0.0), max(oy, 0.0), max(oz, 0.0))

    def clamp(self, p: Vec3) -> Vec3:
        """The point of the closed box nearest to ``p`` (``p`` itself when inside)."""
        lo, hi = self.min, self.max
        return Vec3(min(max(p.x, lo.x), hi.x), min(max(p.y, lo.y), hi.y), min(max(p.z, lo.z), hi.z))

    def nearest_boundary_point(self, p: Vec3) -> Vec3:
        """The point of the box's boundary nearest to ``p``.

        Outside: the nearest point of the box. Inside: ``p`` moved onto its nearest face (the
        first of x, y, z on a tie; the min face on a tie between the two faces of one axis).
        """
        if self.signed_distance(p) < 0.0:
            return self.clamp(p)
        lo, hi = self.min, self.max
        choices = (
            (p.x - lo.x, Vec3(lo.x, p.y, p.z)),
            (hi.x - p.x, Vec3(hi.x, p.y, p.z)),
            (p.y - lo.y, Vec3(p.x, lo.y, p.z)),
            (hi.y - p.y, Vec3(p.x, hi.y, p.z)),
            (p.z - lo.z, Vec3(p.x, p.y, lo.z)),
            (hi.z - p.z, Vec3(p.x, p.y, hi.z)),
        )
        return min(choices, key=lambda choice: choice[0])[1]

    def entry_time(self, origin: Vec3, velocity: Vec3) -> float | None:
        """When ``origin + velocity * t`` first touches the closed box, for ``t >= 0``.

        0.0 when ``origin`` is already in the closed box; None when the ray misses it.
        """
        t_enter, t_leave = 0.0, math.inf
        for o, v, lo, hi in (
            (origin.x, velocity.x, self.min.x, self.max.x),
            (origin.y, velocity.y, self.min.y, self.max.y),
            (origin.z, velocity.z, self.min.z, self.max.z),
        ):
            if v == 0.0:
                if not lo <= o <= hi:
                    return None
                continue
            t1, t2 = (lo - o) / v, (hi - o) / v
            if t1 > t2:
                t1, t2 = t2, t1
            t_enter, t_leave = max(t_enter, t1), min(t_leave, t2)
            if t_enter > t_leave:
                return None
        return t_enter


def _size_vec(value: Vec3 | float) -> Vec3:
    if isinstance(value, Vec3):
        return value
    return Vec3.splat(float(value))


def _positive_vec(_instance: object, attribute: attrs.Attribute[Vec3], value: Vec3) -> None:
    if not (value.is_finite() and value.x > 0.0 and value.y > 0.0 and value.z > 0.0):
        raise ValueError(f"{attribute.name} must be finite and > 0 on every axis, got {value.as_tuple()}")


def _axis_low(origin: float, size: float, index: int) -> float:
    """The low face of cell ``index`` on one axis: the one formula every mapping uses."""
    return origin + index * size


def _axis_cell(p: float, origin: float, size: float) -> int:
    """The cell index of coordinate ``p`` on one axis, exactly consistent with `_axis_low`."""
    if not math.isfinite(p):
        raise ValueError(f"coordinate must be finite, got {p}")
    try:
        index = math.floor((p - origin) / size)
    except OverflowError:
        raise ValueError(f"coordinate {p} is too far from the grid origin") from None
    # The division rounds: next to a face the guess can be one cell off. Walk to the cell whose
    # [low, next low) really holds p, with the same arithmetic as cell_box.
    for _ in range(_MAX_CORRECTION):
        if p < _axis_low(origin, size, index):
            index -= 1
        elif p >= _axis_low(origin, size, index + 1):
            index += 1
        else:
            return index
    raise ValueError(f"coordinate {p} is too far from the grid origin for cells of size {size}")


@attrs.frozen
class Grid:
    """A regular 3-D grid of cells, each ``[origin + c * cell_size, origin + (c + 1) * cell_size)``.

    ``cell_size`` may be given as one number (cubic cells); it is stored as a `Vec3`.
    """

    cell_size: Vec3 = attrs.field(converter=_size_vec, validator=_positive_vec)
    """Size of a cell on each axis, finite and > 0."""
    origin: Vec3 = attrs.field(default=Vec3.ZERO, validator=_finite_vec)
    """The low corner of cell (0, 0, 0)."""

    @classmethod
    def from_horizon(
        cls, center: _Point, bounds: float, region_coord: _IntPoint, *, z_size: float = HORIZON_Z_SIZE
    ) -> Grid:
        """The grid implied by one Horizon registration.

        Horizon's region is a box centred on ``center`` with half-extent ``bounds``, computed from
        the x axis only, so cells are ``2 * bounds`` wide on x and on y; its height is not sent and
        is ``z_size`` (200: Horizon's default region is z in [-100, 100]). The origin is placed so
        that cell ``region_coord`` is exactly that box, its centre at ``center``.

        Raises:
            ValueError: ``bounds`` or ``z_size`` is not > 0, or a value is not finite.
        """
        size = Vec3(2.0 * bounds, 2.0 * bounds, z_size)
        cell = Vec3(region_coord.x + 0.5, region_coord.y + 0.5, region_coord.z + 0.5)
        return cls(size, Vec3.of(center) - cell.mul(size))

    def cell_of(self, p: Vec3) -> Cell:
        """The cell holding ``p``: ``floor((p - origin) / cell_size)`` per axis.

        Always consistent with `cell_box`: ``cell_box(cell_of(p)).contains(p)``; a point on a face
        between two cells is in the one above it.

        Raises:
            ValueError: ``p`` is not finite, or so far from the origin (more than about 2**50
                cells) that neighbouring cells can no longer be told apart.
        """
        o, s = self.origin, self.cell_size
        return Cell(_axis_cell(p.x, o.x, s.x), _axis_cell(p.y, o.y, s.y), _axis_cell(p.z, o.z, s.z))

    def cell_box(self, cell: Cell) -> Box:
        """The box ``[origin + cell * size, origin + (cell + 1) * size)`` of ``cell``.

        Two face neighbours share their face exactly (the same float).

        Raises:
            ValueError: the cell is so far away that its box is empty in floating point.
        """
        o, s = self.origin, self.cell_size
        x, y, z = cell
        return Box(
            Vec3(_axis_low(o.x, s.x, x), _axis_low(o.y, s.y, y), _axis_low(o.z, s.z, z)),
            Vec3(_axis_low(o.x, s.x, x + 1), _axis_low(o.y, s.y, y + 1), _axis_low(o.z, s.z, z + 1)),
        )

    def cell_center(self, cell: Cell) -> Vec3:
        """The middle of ``cell``: ``origin + (cell + 0.5) * cell_size``.

        (Horizon's ``to_world_center`` returns ``cell * size``, half a cell away from the cells its
        own ``floor(p / size)`` mapping makes: see docs/world.md.)
        """
        half = Vec3(cell.x + 0.5, cell.y + 0.5, cell.z + 0.5)
        return self.origin + half.mul(self.cell_size)

    def neighbours(self, cell: Cell) -> tuple[Cell, ...]:
        """The 6 face-adjacent cells, in the order +x, -x, +y, -y, +z, -z (as Horizon lists them)."""
        x, y, z = cell
        return (
            Cell(x + 1, y, z),
            Cell(x - 1, y, z),
            Cell(x, y + 1, z),
            Cell(x, y - 1, z),
            Cell(x, y, z + 1),
            Cell(x, y, z - 1),
        )

    def cells_between(self, low: Vec3, high: Vec3, *, limit: int) -> list[Cell] | None:
        """The cells whose closed boxes meet the closed box ``[low, high]``, or None.

        None when there would be more than ``limit`` of them, when ``low > high`` on some axis, or
        when a corner is not finite or too far away (see `cell_of`). Used to find the few cells near
        a point without scanning every assigned cell.
        """
        if not (low.x <= high.x and low.y <= high.y and low.z <= high.z):
            return None
        try:
            lo, hi = self.cell_of(low), self.cell_of(high)
            face = self.cell_box(lo).min
        except ValueError:
            return None
        # cell_of puts a point on a face in the cell above it; the cell below touches it too.
        first = Cell(lo.x - (face.x == low.x), lo.y - (face.y == low.y), lo.z - (face.z == low.z))
        count = (hi.x - first.x + 1) * (hi.y - first.y + 1) * (hi.z - first.z + 1)
        if count > limit:
            return None
        return [
            Cell(x, y, z)
            for x in range(first.x, hi.x + 1)
            for y in range(first.y, hi.y + 1)
            for z in range(first.z, hi.z + 1)
        ]

    def horizon_mismatch(
        self, center: _Point, bounds: float, region_coord: _IntPoint, *, z_size: float = HORIZON_Z_SIZE
    ) -> str | None:
        """Why a Horizon registration disagrees with this grid, or None when it fits.

        It fits when its box (``center`` +- ``bounds`` on x and y, +- ``z_size / 2`` on z) is the
        box of cell ``region_coord``, up to a relative 1e-9 of the cell size. Horizon takes
        ``region_coord`` from environment variables and ``center`` from its config file, so the two
        can disagree (every server left at the default centre, for one).
        """
        cell = Cell.of(region_coord)
        size = Vec3(2.0 * bounds, 2.0 * bounds, z_size)
        mine = self.cell_size
        tolerance = 1e-9 * max(mine.x, mine.y, mine.z)
        if any(abs(a - b) > tolerance for a, b in zip(size.as_tuple(), mine.as_tuple(), strict=True)):
            return f"region size {size.as_tuple()} differs from the grid's cell size {mine.as_tuple()}"
        expected = self.cell_center(cell)
        if (Vec3.of(center) - expected).length() > tolerance:
            return (
                f"center {Vec3.of(center).as_tuple()} is not the centre {expected.as_tuple()} "
                f"of cell {tuple(cell)}"
            )
        return None
