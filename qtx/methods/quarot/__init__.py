"""QuaRot (Ashkboos et al., NeurIPS 2024): Hadamard rotations of a pre-RMSNorm decoder.

* :mod:`.rotation`: the exact rewrite (RMSNorm gains folded into the next kernels, a random
  Hadamard rotation of the residual stream, the inverse of the online Hadamard transforms in
  o_proj / down_proj), as a composable PTQ stage (``ROTATION``, a :class:`Transform`) and a
  reparametrisation recorded by ``config.model.rotated`` (``ROTATION_REPARAM``).

The online transforms themselves are model code (:mod:`qtx.nn.hadamard`, docs/methods.md §5).
"""

from qtx.methods.quarot.rotation import (
    PAPER,
    ROTATION,
    ROTATION_REPARAM,
    apply_rotation,
    check_rotatable,
    rotate,
    rotate_params_for,
    rotate_variables,
    rotation_seed,
)

__all__ = [
    "PAPER",
    "ROTATION",
    "ROTATION_REPARAM",
    "apply_rotation",
    "check_rotatable",
    "rotate",
    "rotate_params_for",
    "rotate_variables",
    "rotation_seed",
]
