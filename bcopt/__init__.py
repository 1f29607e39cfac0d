"""bcopt: bias-corrected preconditioned optimizers for JAX/Optax.

Cross-fitting and variance-corrected inversion (arXiv:2605.20756) as optax
gradient transformations taking microbatched gradients, plus bias-corrected
iterate averaging (BEMA, arXiv:2508.00180).
"""

__version__ = "0.1.0"

from bcopt._src.adam import ScaleByAdamBCState
from bcopt._src.adam import adamw_bc
from bcopt._src.adam import scale_by_adam_bc
from bcopt._src.averaging import BEMAState
from bcopt._src.averaging import EMAState
from bcopt._src.averaging import bema
from bcopt._src.averaging import bema_params
from bcopt._src.averaging import ema
from bcopt._src.crossfit import cross_fit
from bcopt._src.diagnostics import Diagnostics
from bcopt._src.diagnostics import DiagnosticsState
from bcopt._src.diagnostics import microbatch_diagnostics
from bcopt._src.inverse import variance_correct_inverse
from bcopt._src.microbatch import microbatch_mean
from bcopt._src.shampoo import ScaleByShampooBCState
from bcopt._src.shampoo import scale_by_shampoo_bc
from bcopt._src.shampoo import shampoo_bc
from bcopt._src.soap import ScaleBySoapBCState
from bcopt._src.soap import scale_by_soap_bc
from bcopt._src.soap import soap_bc
from bcopt._src.sophia import ScaleBySophiaBCState
from bcopt._src.sophia import gnb_diag
from bcopt._src.sophia import hutchinson_diag
from bcopt._src.sophia import scale_by_sophia_bc
from bcopt._src.sophia import sophia_bc
from bcopt._src.wrappers import apply_if_finite
from bcopt._src.wrappers import clip_by_global_norm

__all__ = (
    "ScaleByAdamBCState",
    "adamw_bc",
    "scale_by_adam_bc",
    "BEMAState",
    "EMAState",
    "bema",
    "bema_params",
    "ema",
    "cross_fit",
    "Diagnostics",
    "DiagnosticsState",
    "microbatch_diagnostics",
    "variance_correct_inverse",
    "microbatch_mean",
    "ScaleByShampooBCState",
    "scale_by_shampoo_bc",
    "shampoo_bc",
    "ScaleBySoapBCState",
    "scale_by_soap_bc",
    "soap_bc",
    "ScaleBySophiaBCState",
    "gnb_diag",
    "hutchinson_diag",
    "scale_by_sophia_bc",
    "sophia_bc",
    "apply_if_finite",
    "clip_by_global_norm",
)
