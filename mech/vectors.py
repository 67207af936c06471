"""A residual-stream vector (a direction or a steering vector) checked against the model before any hook.

One concept, its own module: :mod:`mech.directions` and :mod:`mech.set_scores` both check vectors the same way,
and the fixtures' cache keys follow the modules a fixture's code imports, so H1/H3 (which use
:mod:`mech.set_scores`) must not come to depend on :mod:`mech.directions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mech.models import LoadedModel


class DirectionError(ValueError):
    """A direction or steering vector that cannot be applied to this model (wrong width, NaN/inf, zero)."""


def as_vector(lm: LoadedModel, vector: Any, what: str) -> Tensor:
    """``vector`` as a float64 CPU ``[d_model]`` tensor, checked before any hook is attached: one line of
    :class:`DirectionError` for a non-vector, a wrong width or non-finite values."""
    if not isinstance(vector, Tensor):
        try:
            vector = torch.as_tensor(np.asarray(vector, dtype=np.float64))
        except (TypeError, ValueError):
            raise DirectionError(f"the {what} must be a tensor of d_model numbers, got a {type(vector).__name__}") from None
    d_model = lm.shape.d_model
    v = vector.detach()
    if v.dim() > 1 and sum(n != 1 for n in v.shape) <= 1:
        v = v.flatten()  # [1, d_model] and the like
    if v.dim() != 1 or v.numel() != d_model:
        raise DirectionError(
            f"the {what} has shape {list(vector.shape)} but this model's residual stream has d_model={d_model}; "
            f"pass a [{d_model}] vector (e.g. DiffInMeans.vector(layer, pos) of this model)"
        )
    if v.is_complex() or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise DirectionError(f"the {what} must be real numbers, got dtype {v.dtype}")
    v = v.double().cpu()
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise DirectionError(
            f"the {what} has {int(bad.sum())} non-finite value(s) (NaN or inf, first at index "
            f"{int(bad.nonzero()[0])}); recompute it (a NaN usually means an empty prompt group in diff_in_means)"
        )
    return v
