"""rf engine: config knobs and generators, chunking, run states and IC Ops, scheduling, checkpoints, the store.

Importing it is cheap (no torch, Prefect or Dash): the CLI and the server import it too.
"""

from rf_core.demo import create_tiny_model, tiny_model_folder
from rf_core.experiment import Experiment, ExperimentSpec
from rf_core.functions import EvaluationContext, evaluation_context
from rf_core.knobs import GridSearch, List, RandomSearch, Range
from rf_core.optuna_search import OptunaSearch

__all__ = [
    "EvaluationContext",
    "Experiment",
    "ExperimentSpec",
    "GridSearch",
    "List",
    "OptunaSearch",
    "RandomSearch",
    "Range",
    "create_tiny_model",
    "evaluation_context",
    "tiny_model_folder",
]
