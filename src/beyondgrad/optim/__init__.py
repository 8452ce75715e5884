"""Second-order optimizers that consume the engine's statistics (:class:`KFAC`,
:class:`SINGD`) or only gradients (:class:`SIRFShampoo`); all are ``torch.optim.Optimizer``
subclasses (:class:`KFACAdam`: Adam in KFAC's eigenbasis) composed from small shared components:

- :mod:`.base`: the shell (param groups read at every step, ``capture()``, the step
  pipeline, ``state_dict`` that resumes bit-identically and refuses a foreign state);
- :mod:`.kronecker`: engine Kronecker statistics for KFAC and SINGD;
- :mod:`.statistics`: accumulation over capture blocks and ranks, batch counting;
- :mod:`.averages`: moving averages (factor averages, Riemannian momenta, momentum);
- :mod:`.schedule`: the refresh schedule (``refresh_every``; ``T`` deprecated);
- :mod:`.damping`, :mod:`.clipping`, :mod:`.grafting`, :mod:`.update`;
- :mod:`.fallback` and :mod:`.routing`: the AdamW fallback and where each parameter goes;
- :mod:`.structures`: structured factors of the inverse-free methods;
- :mod:`.ownership`: owner-based refreshes under ``torch.distributed`` (KFAC ``ownership=``).

See ``docs/optim.md``.
"""

from .base import CurvatureOptimizer
from .kfac import KFAC
from .kfac_adam import KFACAdam
from .ownership import Ownership
from .singd import SINGD
from .sirfshampoo import SIRFShampoo
from .structures import STRUCTURES, Structure, structure

__all__ = [
    "KFAC",
    "SINGD",
    "STRUCTURES",
    "CurvatureOptimizer",
    "KFACAdam",
    "Ownership",
    "SIRFShampoo",
    "Structure",
    "structure",
]
