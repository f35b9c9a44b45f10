"""The world map: which backend owns which part of the world. Pure, no I/O.

A `WorldMap` holds `Region` records, each a half-open `Box` owned by one backend (by name). A region
is either an explicit box (from the config) or one cell of the map's `Grid` (from the config, or from
a Horizon registration, whose ``region_coord`` names the cell). Regions never overlap: adding one that
would is refused with `RegionConflict`, so every point is in at most one region, and a point on a face
shared by two regions is in exactly one of them (the half-open rule of `Box`).

Regions come and go at run time (registrations, admin changes); every change bumps `WorldMap.version`.
Lookups of grid cells cost one `Grid.cell_of` and a dict look-up; explicit boxes are scanned, so keep
their number small (tens), or use a grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs

from atlas.errors import AtlasError
from atlas.world._geometry import HORIZON_Z_SIZE, Box, Cell, Grid, Vec3

if TYPE_CHECKING:
    from atlas.ops.horizon import Registration

__all__ = ["Boundary", "Region", "RegionConflict", "WorldMap"]

# Scanning more cells than this for one `regions_near` query falls back to scanning the assigned ones.
_NEAR_CELL_LIMIT = 64


class RegionConflict(AtlasError):
    """A region change was refused: its id is taken, it overlaps another region, or it needs a grid."""


def _non_empty(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


@attrs.frozen
class Region:
    """A part of the world and the backend that owns it."""

    id: str = attrs.field(validator=_non_empty)
    """Unique name of the region (a Horizon region is named after its server)."""
    box: Box
    """The space it covers, half-open."""
    owner: str = attrs.field(validator=_non_empty)
    """Name of the backend that simulates it."""
    cell: Cell | None = None
    """The grid cell it is, or None for an explicit box."""


@attrs.frozen
class Boundary:
    """The boundary nearest to a point (see `WorldMap.nearest_boundary`)."""

    region: Region
    """The region holding the point, or when none does, the region nearest to it."""
    signed_distance: float
    """``region.box.signed_distance(point)``: >= 0 when inside, < 0 outside (see `Box`)."""
    point: Vec3
    """The point of the region's boundary nearest to the queried point."""
    inside: bool
    """Whether the region holds the queried point."""


class WorldMap:
    """Regions of the world and their owners; see the module docstring.

    Build it empty (optionally with a grid) and add regions, or with `from_regions` / `from_grid`.
    """

    def __init__(self, grid: Grid | None = None) -> None:
        self._grid = grid
        self._regions: dict[str, Region] = {}
        self._cells: dict[Cell, Region] = {}
        self._boxes: dict[str, Region] = {}
        self._version = 0

    @classmethod
    def from_regions(cls, regions: Iterable[Region], *, grid: Grid | None = None) -> WorldMap:
        """A map of ``regions``: those with a ``cell`` are assigned on ``grid``, the others added as boxes.

        A cell region's ``box`` is ignored (the grid's box of its cell is used).

        Raises:
            RegionConflict: two regions share an id or overlap, or a cell region comes without a grid.
        """
        world = cls(grid)
        for region in regions:
            if region.cell is not None:
                world.assign(region.cell, region.owner, region_id=region.id)
            else:
                world.add(region.id, region.box, region.owner)
        return world

    @classmethod
    def from_grid(cls, grid: Grid, owners: Mapping[Cell, str]) -> WorldMap:
        """A map of the cells of ``grid`` named in ``owners``, each owned by the given backend."""
        world = cls(grid)
        for cell, owner in owners.items():
            world.assign(cell, owner)
        return world

    # --------------------------------------------------------------------------------------------
    # Inspection
    # --------------------------------------------------------------------------------------------

    @property
    def grid(self) -> Grid | None:
        """The grid of cell regions (set by the constructor or by the first Horizon registration)."""
        return self._grid

    @property
    def version(self) -> int:
        """A number that changes whenever a region is added, removed or changes hands."""
        return self._version

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[Region]:
        """A snapshot of the regions, in the order they were added."""
        return iter(tuple(self._regions.values()))

    def __contains__(self, region_id: object) -> bool:
        return region_id in self._regions

    def region(self, region_id: str) -> Region | None:
        """The region named ``region_id``, or None."""
        return self._regions.get(region_id)

    def cell_region(self, cell: Cell) -> Region | None:
        """The region of grid cell ``cell``, or None when it is not assigned."""
        return self._cells.get(cell)

    def regions_of(self, owner: str) -> list[Region]:
        """The regions owned by backend ``owner``."""
        return [region for region in self._regions.values() if region.owner == owner]

    # --------------------------------------------------------------------------------------------
    # Changes
    # --------------------------------------------------------------------------------------------

    def add(self, region_id: str, box: Box, owner: str) -> Region:
        """Add an explicit box region.

        Raises:
            RegionConflict: ``region_id`` is taken, or ``box`` overlaps another region.
        """
        if region_id in self._regions:
            raise RegionConflict(f"region {region_id!r} exists")
        region = Region(region_id, box, owner)
        self._check_free(box)
        self._regions[region_id] = region
        self._boxes[region_id] = region
        self._version += 1
        return region

    def assign(self, cell: Cell, owner: str, *, region_id: str | None = None) -> Region:
        """Give grid cell ``cell`` to backend ``owner``, creating its region or changing its owner.

        A new cell region is named ``region_id``, by default ``cell:x,y,z``; an assigned cell keeps
        its name unless ``region_id`` gives another.

        Raises:
            RegionConflict: the map has no grid, ``region_id`` names another region, or the cell
                overlaps an explicit box.
            ValueError: the cell is too far from the grid's origin to have a box (see `Grid.cell_box`).
        """
        grid = self._require_grid()
        cell = Cell(*cell)
        current = self._cells.get(cell)
        if region_id is None:
            region_id = current.id if current is not None else f"cell:{cell.x},{cell.y},{cell.z}"
        other = self._regions.get(region_id)
        if other is not None and other is not current:
            raise RegionConflict(f"region {region_id!r} exists elsewhere")
        box = grid.cell_box(cell)
        if current is None:
            self._check_free(box)
        region = Region(region_id, box, owner, cell)
        if current is not None and current.id != region_id:
            del self._regions[current.id]
        self._regions[region_id] = region
        self._cells[cell] = region
        self._version += 1
        return region

    def unassign(self, cell: Cell) -> Region | None:
        """Remove the region of grid cell ``cell``; return it (None if the cell was not assigned)."""
        region = self._cells.get(Cell(*cell))
        if region is None:
            return None
        return self.remove(region.id)

    def remove(self, region_id: str) -> Region | None:
        """Remove region ``region_id`` (a box or a cell); return it, or None if there was none."""
        region = self._regions.pop(region_id, None)
        if region is None:
            return None
        if region.cell is not None:
            del self._cells[region.cell]
        else:
            del self._boxes[region_id]
        self._version += 1
        return region

    def set_owner(self, region_id: str, owner: str) -> Region:
        """Give region ``region_id`` to backend ``owner``; raise `KeyError` if there is no such region."""
        region = attrs.evolve(self._regions[region_id], owner=owner)
        self._regions[region_id] = region
        if region.cell is not None:
            self._cells[region.cell] = region
        else:
            self._boxes[region_id] = region
        self._version += 1
        return region

    def register_horizon(self, registration: Registration, *, z_size: float = HORIZON_Z_SIZE) -> Region:
        """Apply a Horizon registration: the server named ``name`` owns cell ``region_coord``.

        The region is named after the server and owned by the backend of the same name. The first
        registration on a map without a grid creates the grid (`Grid.from_horizon`: cells
        ``2 * bounds`` wide on x and y, ``z_size`` high, cell ``region_coord`` centred on
        ``center``). Afterwards the cell is what counts: Horizon reads ``region_coord`` and
        ``center`` from different places and they may disagree; `Grid.horizon_mismatch` says how,
        for a log line. A server that registers again with another ``region_coord`` moves there.
        Remove a server's region with `remove` (its name) when it unregisters or is gone.

        Raises:
            RegionConflict: another region holds that cell or overlaps it, or the server's name is an
                explicit box's.
            ValueError: no grid yet and ``bounds`` is 0.
        """
        name = registration.name
        cell = Cell.of(registration.region_coord)
        made_grid = self._grid is None
        if self._grid is None:
            self._grid = Grid.from_horizon(
                registration.center, registration.bounds, registration.region_coord, z_size=z_size
            )
        try:
            existing = self._regions.get(name)
            if existing is not None and existing.cell is None:
                raise RegionConflict(f"region {name!r} is a configured box, not a grid cell")
            occupant = self._cells.get(cell)
            if occupant is not None and occupant.id != name:
                raise RegionConflict(f"cell {tuple(cell)} belongs to region {occupant.id!r}")
            if occupant is None:
                self._check_free(self._grid.cell_box(cell))
        except BaseException:
            if made_grid:
                self._grid = None
            raise
        if existing is not None and existing.cell != cell:
            self.remove(name)  # it moved to another cell
        return self.assign(cell, name, region_id=name)

    # --------------------------------------------------------------------------------------------
    # Queries
    # --------------------------------------------------------------------------------------------

    def region_at(self, p: Vec3) -> Region | None:
        """The region holding ``p`` (half-open boxes: a point on a shared face is in one), or None."""
        if self._cells and self._grid is not None:
            try:
                region = self._cells.get(self._grid.cell_of(p))
            except ValueError:  # not finite, or absurdly far from every cell
                region = None
            if region is not None:
                return region
        for region in self._boxes.values():
            if region.box.contains(p):
                return region
        return None

    def owner_at(self, p: Vec3) -> str | None:
        """The backend owning the region that holds ``p``, or None."""
        region = self.region_at(p)
        return None if region is None else region.owner

    @staticmethod
    def distance_inside(p: Vec3, region: Region) -> float:
        """How deep ``p`` is inside ``region``: its `Box.signed_distance` (negative: outside)."""
        return region.box.signed_distance(p)

    def regions_near(self, p: Vec3, distance: float) -> list[tuple[Region, float]]:
        """Regions with ``signed_distance(p) >= -distance``, with that distance, deepest first.

        That is the region holding ``p`` (if any) and every region within ``distance`` of ``p``.
        Ties are ordered by region id.
        """
        found: list[tuple[Region, float]] = []
        reach = Vec3.splat(max(distance, 0.0))
        for region in self._cells_meeting(p - reach, p + reach):
            depth = region.box.signed_distance(p)
            if depth >= -distance:
                found.append((region, depth))
        for region in self._boxes.values():
            depth = region.box.signed_distance(p)
            if depth >= -distance:
                found.append((region, depth))
        found.sort(key=lambda item: (-item[1], item[0].id))
        return found

    def nearest_boundary(self, p: Vec3) -> Boundary | None:
        """The nearest boundary of the region holding ``p``, or of the region nearest to ``p``.

        None when the map is empty. Inside a region, ``point`` is ``p`` moved onto that region's
        nearest face and ``signed_distance`` (>= 0) is how far that is; outside every region, the
        nearest region is chosen (ties by id) and ``signed_distance`` is minus the distance to it.
        """
        region = self.region_at(p)
        if region is None:
            best: tuple[float, Region] | None = None
            for candidate in self._regions.values():
                depth = candidate.box.signed_distance(p)
                if best is None or depth > best[0] or (depth == best[0] and candidate.id < best[1].id):
                    best = (depth, candidate)
            if best is None:
                return None
            region = best[1]
        depth = region.box.signed_distance(p)
        return Boundary(region, depth, region.box.nearest_boundary_point(p), inside=region.box.contains(p))

    def spawn_owner(self, spawn_point: Vec3, *, nearest: bool = False) -> str | None:
        """The backend a new client spawning at ``spawn_point`` should be placed on.

        The owner of the region holding the spawn point; with ``nearest``, when no region holds it,
        the owner of the nearest region. None when there is none: the caller then uses its
        balancer, as it does when the owner cannot take the client (down, draining or full).
        """
        owner = self.owner_at(spawn_point)
        if owner is None and nearest:
            boundary = self.nearest_boundary(spawn_point)
            owner = None if boundary is None else boundary.region.owner
        return owner

    # --------------------------------------------------------------------------------------------

    def _require_grid(self) -> Grid:
        if self._grid is None:
            raise RegionConflict("this world map has no grid")
        return self._grid

    def _check_free(self, box: Box) -> None:
        """Raise `RegionConflict` if ``box`` overlaps a region."""
        for region in (*self._boxes.values(), *self._cells_meeting(box.min, box.max)):
            if region.box.intersects(box):
                raise RegionConflict(f"overlaps region {region.id!r}")

    def _cells_meeting(self, low: Vec3, high: Vec3) -> Iterable[Region]:
        """Cell regions that may meet the closed box ``[low, high]`` (a superset; maybe all of them)."""
        if not self._cells or self._grid is None:
            return ()
        cells = self._grid.cells_between(low, high, limit=_NEAR_CELL_LIMIT)
        if cells is None:
            return self._cells.values()
        return [region for region in map(self._cells.get, cells) if region is not None]
