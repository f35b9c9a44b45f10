"""The world: regions owned by backends, and predictive transfers at their boundaries.

Sans-IO: plain classes and functions, no trio, no ``await``. `_geometry` has the vectors, half-open
boxes and the grid of cells with their exact mapping and signed distance; `_map` the `WorldMap` of
regions and owners (from the config or from Horizon registrations); `_predictor` the `Predictor`
that turns movements into prepare and transfer decisions for the transfer coordinator.
docs/world.md describes the conventions and the tuning.
"""

from atlas.world._geometry import HORIZON_Z_SIZE, Box, Cell, Grid, Vec3
from atlas.world._map import Boundary, Region, RegionConflict, WorldMap
from atlas.world._predictor import (
    CancelPrepare,
    CancelReason,
    ClientSnapshot,
    Decision,
    Predictor,
    PredictorSettings,
    PredictorStatistics,
    Prepare,
    Transfer,
)

__all__ = [
    "HORIZON_Z_SIZE",
    "Boundary",
    "Box",
    "CancelPrepare",
    "CancelReason",
    "Cell",
    "ClientSnapshot",
    "Decision",
    "Grid",
    "Predictor",
    "PredictorSettings",
    "PredictorStatistics",
    "Prepare",
    "Region",
    "RegionConflict",
    "Transfer",
    "Vec3",
    "WorldMap",
]
