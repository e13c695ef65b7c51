"""muonbp_jax: MuonBP (Muon with block-periodic orthogonalization) for JAX and optax."""

from muonbp_jax._diagnostics import Diagnostics
from muonbp_jax._diagnostics import LeafDiagnostics
from muonbp_jax._diagnostics import MuonBPDiagnostics
from muonbp_jax._diagnostics import StepRecord
from muonbp_jax._diagnostics import read_diagnostics
from muonbp_jax._dimension_numbers import dimension_numbers_from_logical
from muonbp_jax._layout import BlockGrid
from muonbp_jax._layout import DimensionNumbers
from muonbp_jax._layout import Specs
from muonbp_jax._muonbp import BLOCK_LR_RULES
from muonbp_jax._muonbp import MuonBPState
from muonbp_jax._muonbp import ScaleByStepLearningRateState
from muonbp_jax._muonbp import block_lr_factor
from muonbp_jax._muonbp import default_muon_labels
from muonbp_jax._muonbp import is_full_step
from muonbp_jax._muonbp import muonbp
from muonbp_jax._muonbp import scale_by_muonbp
from muonbp_jax._muonbp import scale_by_step_learning_rate
from muonbp_jax._muonbp import shape_scale
from muonbp_jax._newton_schulz import AUTO_METHODS
from muonbp_jax._newton_schulz import NS_COEFFS_PRESETS
from muonbp_jax._newton_schulz import orthogonalize
from muonbp_jax._placement import partition_specs
from muonbp_jax._steps import FULL_STRATEGIES
from muonbp_jax._steps import FullStrategy
from optax.contrib import MuonDimensionNumbers  # re-exported for per-leaf dimension numbers

__version__ = "0.4.0"

__all__ = [
    "AUTO_METHODS",
    "BLOCK_LR_RULES",
    "FULL_STRATEGIES",
    "NS_COEFFS_PRESETS",
    "BlockGrid",
    "Diagnostics",
    "DimensionNumbers",
    "FullStrategy",
    "LeafDiagnostics",
    "MuonBPDiagnostics",
    "MuonBPState",
    "MuonDimensionNumbers",
    "ScaleByStepLearningRateState",
    "Specs",
    "StepRecord",
    "block_lr_factor",
    "default_muon_labels",
    "dimension_numbers_from_logical",
    "is_full_step",
    "muonbp",
    "orthogonalize",
    "partition_specs",
    "read_diagnostics",
    "scale_by_muonbp",
    "scale_by_step_learning_rate",
    "shape_scale",
]
