"""srfx passes: one module per pass, one public entry point each.

- :func:`mask` — unstructured magnitude pruning (a masked copy and its masks).
- :func:`minimize` — apply a removal plan: a smaller dense GraphModule, same function.
- :func:`compensate_ln` — finish a minimize that narrowed LayerNorm streams (CompensatedLayerNorm).
- :func:`fold_batchnorm` — fold eval-mode BatchNorm into the conv that feeds it.
- :func:`release` — exact zeros inside weights become small calibrated noise (a copy).

Only the public API (:mod:`srfx.api`) orders passes; passes never call each other.
"""
from .mask import apply_masks, magnitude_masks, mask, unit_masks
from .fold_batchnorm import fold_batchnorm
from .minimize import minimize
from .compensate_ln import compensate_ln
from .release import release

__all__ = ["mask", "magnitude_masks", "unit_masks", "apply_masks", "minimize", "compensate_ln", "fold_batchnorm", "release"]
