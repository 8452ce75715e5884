"""Pruning to a target sparsity with curvature: magnitude, OBD (diagonal curvature),
OBS/WoodFisher (the empirical-Fisher inverse by Woodbury, block-diagonal) and layer-wise OBS
with the damped input Gram (OBC/SparseGPT-style). Every method returns a
:class:`PruningResult`: a pruned copy of the model and keep-masks usable with
``torch.nn.utils.prune`` (see :mod:`beyondgrad.pruning.masks` for the sparsity conventions)."""

from .layerwise import damped_gram, layerwise_obs, prune_columns
from .masks import (
    SCOPES,
    PruningResult,
    apply_masks,
    check_sparsity,
    mask_sparsity,
    masked_copy,
    masks_from_scores,
    prunable_parameters,
)
from .obs import (
    UPDATES,
    BlockFisherInverse,
    fisher_inverse,
    obs_downdate,
    obs_prune_blocks,
    obs_saliency,
    obs_update,
    woodbury_absorb,
    woodfisher,
)
from .select import DAMPING_GRID, mean_loss, pruned_losses, select_damping
from .simple import magnitude, obd, obd_scores

__all__ = [
    "DAMPING_GRID",
    "SCOPES",
    "UPDATES",
    "BlockFisherInverse",
    "PruningResult",
    "apply_masks",
    "check_sparsity",
    "damped_gram",
    "fisher_inverse",
    "layerwise_obs",
    "magnitude",
    "mask_sparsity",
    "masked_copy",
    "masks_from_scores",
    "mean_loss",
    "obd",
    "obd_scores",
    "obs_downdate",
    "obs_prune_blocks",
    "obs_saliency",
    "obs_update",
    "prunable_parameters",
    "prune_columns",
    "pruned_losses",
    "select_damping",
    "woodbury_absorb",
    "woodfisher",
]
