import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Derandomized so CI runs the same examples every time; no deadline (numba compiles on
# first use).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
