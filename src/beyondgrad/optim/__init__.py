"""Second-order optimizers that consume the engine's statistics (:class:`KFAC`,
:class:`SINGD`) or only gradients (:class:`SIRFShampoo`); all are ``torch.optim.Optimizer``
subclasses sharing one shell (:mod:`beyondgrad.optim.base`): routing to an AdamW fallback,
``capture()`` for statistics, data-parallel reduction, bit-identical ``state_dict`` resume.
"""

from .base import CurvatureOptimizer
from .kfac import KFAC
from .singd import SINGD
from .sirfshampoo import SIRFShampoo
from .structures import STRUCTURES, Structure, structure

__all__ = [
    "KFAC",
    "SINGD",
    "STRUCTURES",
    "CurvatureOptimizer",
    "SIRFShampoo",
    "Structure",
    "structure",
]
