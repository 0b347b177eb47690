"""Prefect flows: orchestration only; the logic lives in rf_core."""

import os

# A fresh ephemeral Prefect API creates its database on first use: ~17 s here, close to Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
