import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Everything runs offline, and no test may touch the user's own store or Prefect home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests build their tiny models in temporary folders: those are the model roots (one test checks the default).
os.environ.setdefault("RF_MODEL_ROOTS", tempfile.gettempdir())
# Fits start temporary rf and Prefect servers that exit with them: no test leaves services behind (rf up's tests
# start and stop their own, on ports of their own).
os.environ["RF_EPHEMERAL"] = "1"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for a test module's browser tests (each opens pages of its own). Per module: Playwright's
    sync API allows one driver per thread, and none is left running beside the other modules' tests."""
    from tests.e2e.browser.chromium import launched

    with launched() as chromium:
        yield chromium
