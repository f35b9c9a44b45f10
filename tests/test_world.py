"""Tests for the world geometry (vectors, boxes, the grid) and the world map."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from atlas.ops.horizon import Registration
from atlas.world import (
    HORIZON_Z_SIZE,
    Box,
    Cell,
    Grid,
    Region,
    RegionConflict,
    Vec3,
    WorldMap,
)

# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

coordinates = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
sizes = st.floats(1e-2, 1e4, allow_nan=False, allow_infinity=False)
indices = st.integers(-1000, 1000)


def vec3s(component: st.SearchStrategy[float] = coordinates) -> st.SearchStrategy[Vec3]:
    return st.builds(Vec3, component, component, component)


grids = st.builds(Grid, vec3s(sizes), vec3s(st.floats(-1e4, 1e4, allow_nan=False)))
cells = st.builds(Cell, indices, indices, indices)


@st.composite
def boxes(draw: st.DrawFn) -> Box:
    low = draw(vec3s())
    size = draw(vec3s(sizes))
    high = low + size
    assume(low.x < high.x and low.y < high.y and low.z < high.z)
    return Box(low, high)


def slack(*values: float) -> float:
    """A tolerance of a few ulps of the largest magnitude involved."""
    return 16 * math.ulp(max(1.0, *(abs(v) for v in values)))


def registration(
    name: str, coord: tuple[int, int, int], center: tuple[float, float, float], bounds: float
) -> Registration:
    body: dict[str, Any] = {
        "name": name,
        "address": "127.0.0.1:8081",
        "region_coord": dict(zip("xyz", coord, strict=True)),
        "center": dict(zip("xyz", center, strict=True)),
        "bounds": bounds,
        "capacity": 100,
    }
    return Registration.from_json(body)


# ------------------------------------------------------------------------------------------------
# Vec3
# ------------------------------------------------------------------------------------------------


def test_vec3_arithmetic() -> None:
    a, b = Vec3(1.0, 2.0, 3.0), Vec3(-4.0, 0.5, 2.0)
    assert a + b == Vec3(-3.0, 2.5, 5.0)
    assert a - b == Vec3(5.0, 1.5, 1.0)
    assert -a == Vec3(-1.0, -2.0, -3.0)
    assert a.scale(2.0) == Vec3(2.0, 4.0, 6.0)
    assert a.mul(b) == Vec3(-4.0, 1.0, 6.0)
    assert a.dot(b) == -4.0 + 1.0 + 6.0
    assert Vec3(3.0, 4.0, 12.0).length() == 13.0
    assert Vec3.ZERO.length() == 0.0
    assert Vec3.splat(2.0) == Vec3(2.0, 2.0, 2.0)
    assert not Vec3(0.0, math.nan, 0.0).is_finite()
    assert not Vec3(math.inf, 0.0, 0.0).is_finite()
    assert Vec3(1e-200, 0.0, 0.0).length() == 1e-200  # no underflow in the squares


# ------------------------------------------------------------------------------------------------
# Box
# ------------------------------------------------------------------------------------------------


def test_box_validation() -> None:
    with pytest.raises(ValueError, match="below max"):
        Box(Vec3(0.0, 0.0, 0.0), Vec3(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Box(Vec3(0.0, 0.0, 0.0), Vec3(1.0, math.inf, 1.0))
    box = Box.from_center(Vec3(1.0, 2.0, 3.0), Vec3(1.0, 2.0, 3.0))
    assert box == Box(Vec3(0.0, 0.0, 0.0), Vec3(2.0, 4.0, 6.0))
    assert box.center == Vec3(1.0, 2.0, 3.0)
    assert box.half_extent == Vec3(1.0, 2.0, 3.0)
    assert box.size == Vec3(2.0, 4.0, 6.0)


def test_box_is_half_open_and_signed_distance_examples() -> None:
    box = Box(Vec3(0.0, 0.0, 0.0), Vec3(10.0, 10.0, 10.0))
    assert box.contains(Vec3(0.0, 0.0, 0.0))
    assert not box.contains(Vec3(10.0, 5.0, 5.0))
    assert box.signed_distance(Vec3(5.0, 5.0, 5.0)) == 5.0
    assert box.signed_distance(Vec3(1.0, 5.0, 5.0)) == 1.0
    assert box.signed_distance(Vec3(10.0, 5.0, 5.0)) == 0.0
    assert math.copysign(1.0, box.signed_distance(Vec3(0.0, 5.0, 5.0))) == 1.0  # +0.0, not -0.0
    assert box.signed_distance(Vec3(13.0, 14.0, 5.0)) == -5.0  # Euclidean, not the largest axis gap
    assert box.signed_distance(Vec3(-1e-300, 5.0, 5.0)) < 0.0  # no underflow to 0 outside
    assert box.nearest_boundary_point(Vec3(1.0, 5.0, 6.0)) == Vec3(0.0, 5.0, 6.0)
    assert box.nearest_boundary_point(Vec3(13.0, 14.0, 5.0)) == Vec3(10.0, 10.0, 5.0)
    assert box.entry_time(Vec3(-5.0, 5.0, 5.0), Vec3(2.0, 0.0, 0.0)) == 2.5
    assert box.entry_time(Vec3(-5.0, 5.0, 5.0), Vec3(-2.0, 0.0, 0.0)) is None
    assert box.entry_time(Vec3(-5.0, 20.0, 5.0), Vec3(2.0, 0.0, 0.0)) is None
    assert box.entry_time(Vec3(5.0, 5.0, 5.0), Vec3.ZERO) == 0.0


def test_boxes_sharing_a_face_do_not_intersect() -> None:
    left = Box(Vec3(0.0, 0.0, 0.0), Vec3(1.0, 1.0, 1.0))
    right = Box(Vec3(1.0, 0.0, 0.0), Vec3(2.0, 1.0, 1.0))
    assert not left.intersects(right)
    assert left.intersects(Box(Vec3(0.5, 0.5, 0.5), Vec3(3.0, 3.0, 3.0)))
    face = Vec3(1.0, 0.5, 0.5)
    assert [left.contains(face), right.contains(face)] == [False, True]


@given(boxes(), vec3s())
def test_signed_distance_sign_agrees_with_contains(box: Box, p: Vec3) -> None:
    distance = box.signed_distance(p)
    if distance > 0.0:
        assert box.contains(p)
    if distance < 0.0:
        assert not box.contains(p)
    if box.contains(p):
        assert distance >= 0.0


@given(boxes(), vec3s())
def test_signed_distance_magnitude(box: Box, p: Vec3) -> None:
    distance = box.signed_distance(p)
    lo, hi = box.min, box.max
    if distance < 0.0:
        # Outside: minus the Euclidean distance to the nearest point of the box.
        nearest = box.clamp(p)
        assert math.isclose(-distance, (p - nearest).length(), rel_tol=1e-12)
    else:
        # Inside (or on it): the distance to the nearest face.
        faces = (p.x - lo.x, hi.x - p.x, p.y - lo.y, hi.y - p.y, p.z - lo.z, hi.z - p.z)
        assert distance == min(faces)


@given(boxes(), st.sampled_from("xyz"), st.booleans(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_signed_distance_is_zero_on_every_face(box: Box, axis: str, high: bool, u: float, v: float) -> None:
    lo, hi = box.min.as_tuple(), box.max.as_tuple()
    point = []
    others = iter((u, v))
    for i, name in enumerate("xyz"):
        if name == axis:
            point.append(hi[i] if high else lo[i])
        else:
            f = next(others)
            point.append(min(max(lo[i] + f * (hi[i] - lo[i]), lo[i]), hi[i]))
    p = Vec3(*point)
    assert box.signed_distance(p) == 0.0
    assert box.contains(p) == (not high and all(c < h for c, h in zip(point, hi, strict=True)))


@given(boxes(), vec3s(), vec3s(st.floats(-100.0, 100.0)))
def test_signed_distance_is_one_lipschitz(box: Box, p: Vec3, step: Vec3) -> None:
    q = p + step
    moved = abs(box.signed_distance(q) - box.signed_distance(p))
    assert moved <= (q - p).length() + slack(
        *p.as_tuple(), *q.as_tuple(), *box.max.as_tuple(), *box.min.as_tuple()
    )


# ------------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------------


def test_grid_validation() -> None:
    with pytest.raises(ValueError, match="> 0"):
        Grid(0.0)
    with pytest.raises(ValueError, match="> 0"):
        Grid(Vec3(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Grid(1.0, Vec3(math.nan, 0.0, 0.0))
    assert Grid(2.0).cell_size == Vec3(2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        Grid(1.0).cell_of(Vec3(math.inf, 0.0, 0.0))
    with pytest.raises(ValueError, match="too far"):
        Grid(1e-3).cell_of(Vec3(1e300, 0.0, 0.0))


def test_grid_examples() -> None:
    grid = Grid(10.0)
    assert grid.cell_of(Vec3(0.0, 9.999, -0.001)) == Cell(0, 0, -1)
    assert grid.cell_of(Vec3(10.0, -10.0, -10.001)) == Cell(1, -1, -2)
    assert grid.cell_box(Cell(-1, 0, 2)) == Box(Vec3(-10.0, 0.0, 20.0), Vec3(0.0, 10.0, 30.0))
    assert grid.cell_center(Cell(0, 0, 0)) == Vec3(5.0, 5.0, 5.0)
    assert grid.cell_center(Cell(-1, 0, 0)) == Vec3(-5.0, 5.0, 5.0)
    # Where plain floor((p - o) / s) is wrong: 0.3 / 0.1 rounds to 2.9999999999999996.
    tenth = Grid(0.1)
    p = Vec3(0.30000000000000004, 0.0, 0.0)
    assert tenth.cell_box(tenth.cell_of(p)).contains(p)


@given(grids, vec3s())
def test_the_cell_of_a_point_contains_it(grid: Grid, p: Vec3) -> None:
    assert grid.cell_box(grid.cell_of(p)).contains(p)


@given(grids, cells, st.tuples(*[st.sampled_from(["low", "inside", "high"])] * 3), st.floats(0.0, 0.999))
def test_points_on_faces_belong_to_the_cell_above(
    grid: Grid, cell: Cell, where: tuple[str, str, str], fraction: float
) -> None:
    box = grid.cell_box(cell)
    point, expected = [], []
    for lo, hi, index, spot in zip(box.min.as_tuple(), box.max.as_tuple(), cell, where, strict=True):
        if spot == "low":
            point.append(lo)
            expected.append(index)
        elif spot == "high":
            point.append(hi)
            expected.append(index + 1)
        else:
            inner = lo + fraction * (hi - lo)
            point.append(inner)
            expected.append(index if inner < hi else index + 1)
    p = Vec3(*point)
    assert grid.cell_of(p) == Cell(*expected)
    assert grid.cell_box(grid.cell_of(p)).contains(p)


@given(grids, cells)
def test_cell_center_is_inside_its_cell_half_a_cell_deep(grid: Grid, cell: Cell) -> None:
    center = grid.cell_center(cell)
    assert grid.cell_of(center) == cell
    box = grid.cell_box(cell)
    half = min(grid.cell_size.as_tuple()) / 2
    tolerance = slack(*box.min.as_tuple(), *box.max.as_tuple())
    assert abs(box.signed_distance(center) - half) <= tolerance
    assert (box.center - center).length() <= 2 * tolerance


@given(grids, cells)
def test_neighbours_share_a_face_exactly(grid: Grid, cell: Cell) -> None:
    neighbours = grid.neighbours(cell)
    assert len(set(neighbours)) == 6
    box = grid.cell_box(cell)
    for other in neighbours:
        assert cell.is_adjacent(other)
        other_box = grid.cell_box(other)
        assert not box.intersects(other_box)
        axis = next(i for i in range(3) if cell[i] != other[i])
        mine, theirs = (
            (box.min.as_tuple(), box.max.as_tuple()),
            (other_box.min.as_tuple(), other_box.max.as_tuple()),
        )
        if other[axis] > cell[axis]:
            assert theirs[0][axis] == mine[1][axis]
        else:
            assert theirs[1][axis] == mine[0][axis]
        for i in range(3):
            if i != axis:
                assert theirs[0][i] == mine[0][i] and theirs[1][i] == mine[1][i]


@given(grids, vec3s(st.floats(-1e5, 1e5)), st.floats(0.0, 1e3))
def test_cells_between_finds_every_touching_cell(grid: Grid, p: Vec3, reach: float) -> None:
    low, high = p - Vec3.splat(reach), p + Vec3.splat(reach)
    found = grid.cells_between(low, high, limit=10_000)
    assume(found is not None)
    assert found is not None
    assert grid.cell_of(p) in found
    assert grid.cell_of(low) in found and grid.cell_of(high) in found
    for cell in found:
        box = grid.cell_box(cell)
        # Every cell found touches the closed query box.
        assert box.min.x <= high.x and low.x <= box.max.x
        assert box.min.y <= high.y and low.y <= box.max.y
        assert box.min.z <= high.z and low.z <= box.max.z


def test_cells_between_includes_the_cell_below_a_face() -> None:
    grid = Grid(10.0)
    found = grid.cells_between(Vec3(10.0, 5.0, 5.0), Vec3(12.0, 5.0, 5.0), limit=100)
    assert found == [Cell(0, 0, 0), Cell(1, 0, 0)]
    assert grid.cells_between(Vec3(0.0, 0.0, 0.0), Vec3(1000.0, 1000.0, 1000.0), limit=100) is None


# ------------------------------------------------------------------------------------------------
# Horizon's model
# ------------------------------------------------------------------------------------------------


def test_grid_from_horizon_default_registration() -> None:
    grid = Grid.from_horizon(Vec3.ZERO, 1000.0, Cell(0, 0, 0))
    assert grid.cell_size == Vec3(2000.0, 2000.0, HORIZON_Z_SIZE)
    assert grid.cell_box(Cell(0, 0, 0)) == Box(Vec3(-1000.0, -1000.0, -100.0), Vec3(1000.0, 1000.0, 100.0))
    assert grid.cell_center(Cell(1, 0, 0)) == Vec3(2000.0, 0.0, 0.0)  # what Horizon's to_world_center says
    # Horizon's from_world_coordinate (floor(p / size)) puts x = 1500 in region 0, whose centre it
    # says is 0: half a cell off. Here it is in cell 1, [1000, 3000), centred on 2000.
    assert grid.cell_of(Vec3(1500.0, 0.0, 0.0)) == Cell(1, 0, 0)
    assert grid.cell_of(Vec3(999.0, -1000.0, -100.0)) == Cell(0, 0, 0)
    assert grid.cell_of(Vec3(0.0, 0.0, 100.0)) == Cell(0, 0, 1)
    assert Grid.from_horizon(Vec3.ZERO, 1000.0, Cell(0, 0, 0), z_size=2000.0).cell_size.z == 2000.0
    with pytest.raises(ValueError, match="> 0"):
        Grid.from_horizon(Vec3.ZERO, 0.0, Cell(0, 0, 0))


@given(vec3s(st.floats(-1e6, 1e6)), st.floats(1.0, 1e5), cells, st.floats(1.0, 1e4))
def test_grid_from_horizon_puts_the_region_in_its_cell(
    center: Vec3, bounds: float, coord: Cell, z_size: float
) -> None:
    grid = Grid.from_horizon(center, bounds, coord, z_size=z_size)
    box = grid.cell_box(coord)
    expected = Box.from_center(center, Vec3(bounds, bounds, z_size / 2))
    tolerance = 1e-9 * max(1.0, *(abs(c) for c in (*expected.min.as_tuple(), *expected.max.as_tuple())))
    for a, b in zip(
        (*box.min.as_tuple(), *box.max.as_tuple()),
        (*expected.min.as_tuple(), *expected.max.as_tuple()),
        strict=True,
    ):
        assert abs(a - b) <= tolerance
    assert grid.cell_of(grid.cell_center(coord)) == coord
    assert grid.horizon_mismatch(center, bounds, coord, z_size=z_size) is None


def test_horizon_mismatch_explains() -> None:
    grid = Grid.from_horizon(Vec3.ZERO, 1000.0, Cell(0, 0, 0))
    assert grid.horizon_mismatch(Vec3(2000.0, 0.0, 0.0), 1000.0, Cell(1, 0, 0)) is None
    message = grid.horizon_mismatch(Vec3.ZERO, 1000.0, Cell(1, 0, 0))
    assert message is not None and "not the centre" in message
    message = grid.horizon_mismatch(Vec3(2000.0, 0.0, 0.0), 500.0, Cell(1, 0, 0))
    assert message is not None and "cell size" in message


# ------------------------------------------------------------------------------------------------
# WorldMap
# ------------------------------------------------------------------------------------------------


def test_boxes_regions_and_lookups() -> None:
    world = WorldMap()
    west = world.add("west", Box(Vec3(-100.0, -100.0, -10.0), Vec3(0.0, 100.0, 10.0)), "gs-1")
    east = world.add("east", Box(Vec3(0.0, -100.0, -10.0), Vec3(100.0, 100.0, 10.0)), "gs-2")
    assert len(world) == 2 and "west" in world and list(world) == [west, east]
    assert world.region_at(Vec3(-0.5, 0.0, 0.0)) is west
    assert world.region_at(Vec3(0.0, 0.0, 0.0)) is east  # the shared face is east's min face
    assert world.region_at(Vec3(100.0, 0.0, 0.0)) is None
    assert world.owner_at(Vec3(50.0, 0.0, 0.0)) == "gs-2"
    assert world.owner_at(Vec3(0.0, 0.0, 50.0)) is None
    assert world.distance_inside(Vec3(-3.0, 0.0, 0.0), west) == 3.0
    assert world.distance_inside(Vec3(-3.0, 0.0, 0.0), east) == -3.0
    assert world.regions_of("gs-2") == [east]
    with pytest.raises(RegionConflict, match="exists"):
        world.add("west", Box(Vec3(500.0, 0.0, 0.0), Vec3(600.0, 1.0, 1.0)), "gs-3")
    with pytest.raises(RegionConflict, match="overlaps region 'east'"):
        world.add("middle", Box(Vec3(50.0, 50.0, 0.0), Vec3(150.0, 150.0, 1.0)), "gs-3")
    with pytest.raises(RegionConflict, match="no grid"):
        world.assign(Cell(0, 0, 0), "gs-3")
    version = world.version
    assert world.set_owner("east", "gs-3").owner == "gs-3"
    assert world.owner_at(Vec3(50.0, 0.0, 0.0)) == "gs-3"
    assert world.remove("east") is not None and world.remove("east") is None
    assert world.version == version + 2
    with pytest.raises(KeyError):
        world.set_owner("east", "gs-1")
    with pytest.raises(ValueError, match="empty"):
        world.add("", Box(Vec3(500.0, 0.0, 0.0), Vec3(600.0, 1.0, 1.0)), "gs-3")


def test_grid_regions_assign_unassign() -> None:
    grid = Grid(Vec3(100.0, 100.0, 50.0), Vec3(-100.0, -100.0, -25.0))
    world = WorldMap.from_grid(grid, {Cell(0, 0, 0): "a", Cell(1, 0, 0): "b"})
    assert world.grid is grid
    region = world.region_at(Vec3(-50.0, -50.0, 0.0))
    assert region is not None and region.id == "cell:0,0,0" and region.cell == Cell(0, 0, 0)
    assert region.box == grid.cell_box(Cell(0, 0, 0))
    assert world.owner_at(Vec3(0.0, -50.0, 0.0)) == "b"
    assert world.owner_at(Vec3(0.0, 0.0, 0.0)) is None  # cell (1, 1, 0) is not assigned
    # Changing the owner keeps the name; a new name renames it.
    assert world.assign(Cell(1, 0, 0), "c").id == "cell:1,0,0"
    assert world.assign(Cell(1, 0, 0), "c", region_id="east").id == "east"
    assert "cell:1,0,0" not in world and world.cell_region(Cell(1, 0, 0)) is world.region("east")
    with pytest.raises(RegionConflict, match="exists elsewhere"):
        world.assign(Cell(5, 0, 0), "d", region_id="east")
    # An explicit box may not overlap a cell, and a cell may not overlap a box; sharing a face is fine.
    with pytest.raises(RegionConflict, match="overlaps region 'east'"):
        world.add("box", Box(Vec3(50.0, -50.0, 0.0), Vec3(150.0, 0.0, 10.0)), "d")
    world.add("box", Box(Vec3(100.0, -100.0, -25.0), Vec3(200.0, 0.0, 25.0)), "d")
    assert world.owner_at(Vec3(100.0, -50.0, 0.0)) == "d"
    with pytest.raises(RegionConflict, match="overlaps region 'box'"):
        world.assign(Cell(2, 0, 0), "e")
    assert world.unassign(Cell(1, 0, 0)) is not None
    assert world.unassign(Cell(1, 0, 0)) is None
    assert world.owner_at(Vec3(50.0, -50.0, 0.0)) is None
    rebuilt = WorldMap.from_regions(list(world), grid=grid)
    assert list(rebuilt) == list(world)
    with pytest.raises(RegionConflict, match="no grid"):
        WorldMap.from_regions(list(world))


@st.composite
def grid_worlds(draw: st.DrawFn) -> WorldMap:
    grid = draw(grids)
    owners = draw(
        st.dictionaries(
            st.builds(Cell, *[st.integers(-2, 2)] * 3), st.sampled_from(["a", "b", "c"]), max_size=30
        )
    )
    return WorldMap.from_grid(grid, owners)


@st.composite
def points_near_cells(draw: st.DrawFn, grid: Grid) -> Vec3:
    """Points in cells -3..3, often exactly on faces, edges and corners."""
    cell = draw(st.builds(Cell, *[st.integers(-3, 3)] * 3))
    box = grid.cell_box(cell)
    coords = []
    for lo, hi in zip(box.min.as_tuple(), box.max.as_tuple(), strict=True):
        f = draw(st.sampled_from([0.0, 0.0, 1.0, 0.5]) | st.floats(0.0, 1.0))
        coords.append(min(lo + f * (hi - lo), hi))
    return Vec3(*coords)


@given(st.data())
def test_region_at_and_signed_distance_agree(data: st.DataObject) -> None:
    world = data.draw(grid_worlds())
    assert world.grid is not None
    p = data.draw(points_near_cells(world.grid))
    found = world.region_at(p)
    holders = [region for region in world if region.box.contains(p)]
    assert holders == ([found] if found is not None else [])
    for region in world:
        distance = world.distance_inside(p, region)
        if region is found:
            assert distance >= 0.0
        else:
            assert distance <= 0.0  # at most on its boundary
        if distance > 0.0:
            assert region is found
    assert world.owner_at(p) == (None if found is None else found.owner)


@given(st.data(), st.floats(0.0, 500.0))
def test_regions_near_is_the_brute_force_answer(data: st.DataObject, reach: float) -> None:
    world = data.draw(grid_worlds())
    assert world.grid is not None
    world.add("far", Box(Vec3(1e7, 1e7, 1e7), Vec3(1e7 + 10, 1e7 + 10, 1e7 + 10)), "z")
    p = data.draw(points_near_cells(world.grid))
    expected = sorted(
        ((r, r.box.signed_distance(p)) for r in world if r.box.signed_distance(p) >= -reach),
        key=lambda item: (-item[1], item[0].id),
    )
    assert world.regions_near(p, reach) == expected


def test_nearest_boundary() -> None:
    world = WorldMap()
    assert world.nearest_boundary(Vec3.ZERO) is None
    west = world.add("west", Box(Vec3(-100.0, -100.0, -10.0), Vec3(0.0, 100.0, 10.0)), "gs-1")
    world.add("east", Box(Vec3(10.0, -100.0, -10.0), Vec3(100.0, 100.0, 10.0)), "gs-2")
    inside = world.nearest_boundary(Vec3(-3.0, 50.0, 0.0))
    assert inside is not None
    assert (inside.region, inside.signed_distance, inside.point, inside.inside) == (
        west,
        3.0,
        Vec3(0.0, 50.0, 0.0),
        True,
    )
    gap = world.nearest_boundary(Vec3(4.0, 0.0, 0.0))  # in the gap between them, nearer west
    assert gap is not None
    assert (gap.region, gap.signed_distance, gap.point, gap.inside) == (
        west,
        -4.0,
        Vec3(0.0, 0.0, 0.0),
        False,
    )
    tie = world.nearest_boundary(Vec3(5.0, 0.0, 0.0))
    assert tie is not None and tie.region.id == "east"  # equally near: the smaller id


def test_spawn_owner() -> None:
    world = WorldMap.from_grid(Grid(100.0), {Cell(0, 0, 0): "a", Cell(1, 0, 0): "b"})
    assert world.spawn_owner(Vec3(150.0, 50.0, 50.0)) == "b"
    assert world.spawn_owner(Vec3(50.0, 50.0, 500.0)) is None
    assert world.spawn_owner(Vec3(50.0, 50.0, 500.0), nearest=True) == "a"
    assert WorldMap().spawn_owner(Vec3.ZERO, nearest=True) is None


def test_horizon_registrations() -> None:
    world = WorldMap()
    first = world.register_horizon(registration("horizon-0-0-0", (0, 0, 0), (0.0, 0.0, 0.0), 1000.0))
    assert world.grid == Grid.from_horizon(Vec3.ZERO, 1000.0, Cell(0, 0, 0))
    assert first == Region(
        "horizon-0-0-0",
        Box(Vec3(-1000.0, -1000.0, -100.0), Vec3(1000.0, 1000.0, 100.0)),
        "horizon-0-0-0",
        Cell(0, 0, 0),
    )
    east = world.register_horizon(registration("horizon-1-0-0", (1, 0, 0), (2000.0, 0.0, 0.0), 1000.0))
    assert east.box.min.x == first.box.max.x == 1000.0
    assert world.owner_at(Vec3(1000.0, 0.0, 0.0)) == "horizon-1-0-0"
    assert world.owner_at(Vec3(999.9, 0.0, 0.0)) == "horizon-0-0-0"
    # Registering again is an update; with another region_coord the server moves.
    assert (
        world.register_horizon(registration("horizon-1-0-0", (1, 0, 0), (2000.0, 0.0, 0.0), 1000.0)) == east
    )
    moved = world.register_horizon(registration("horizon-1-0-0", (0, 1, 0), (2000.0, 0.0, 0.0), 1000.0))
    assert moved.cell == Cell(0, 1, 0) and world.cell_region(Cell(1, 0, 0)) is None
    # The cell decides, even when Horizon's center disagrees; the grid says how.
    stale = registration("horizon-2-0-0", (2, 0, 0), (0.0, 0.0, 0.0), 1000.0)
    assert world.register_horizon(stale).cell == Cell(2, 0, 0)
    assert world.grid is not None
    assert world.grid.horizon_mismatch(stale.center, stale.bounds, stale.region_coord) is not None
    with pytest.raises(RegionConflict, match="belongs to region 'horizon-0-0-0'"):
        world.register_horizon(registration("intruder", (0, 0, 0), (0.0, 0.0, 0.0), 1000.0))
    assert world.remove("horizon-2-0-0") is not None
    assert world.owner_at(Vec3(4000.0, 0.0, 0.0)) is None


def test_horizon_registration_conflicts_leave_the_map_unchanged() -> None:
    world = WorldMap()
    world.add("configured", Box(Vec3(-10.0, -10.0, -10.0), Vec3(10.0, 10.0, 10.0)), "gs-1")
    with pytest.raises(RegionConflict, match="overlaps region 'configured'"):
        world.register_horizon(registration("horizon-0-0-0", (0, 0, 0), (0.0, 0.0, 0.0), 1000.0))
    assert world.grid is None and len(world) == 1
    with pytest.raises(RegionConflict, match="configured box"):
        world.register_horizon(registration("configured", (5, 0, 0), (0.0, 0.0, 0.0), 1000.0))
    assert world.grid is None and len(world) == 1
    with pytest.raises(ValueError, match="> 0"):
        world.register_horizon(registration("flat", (5, 0, 0), (0.0, 0.0, 0.0), 0.0))
    assert world.grid is None
