"""Test-wide settings: hypothesis runs the same examples every time unless asked to explore.

CI and the README's test command must not fail at random: by default every property test is
derandomized (its examples are seeded from the test itself). To search further, run
``ATLAS_HYPOTHESIS=explore python -m pytest -q``: random seeds and the example database, as hypothesis
does by default; report what it finds as a failing example in the test.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("ATLAS_HYPOTHESIS", "deterministic"))
