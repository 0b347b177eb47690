import os
import tempfile

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
