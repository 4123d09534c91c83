"""Building blocks of every options schema (recipe sections and pass options).

:class:`StrictModel` forbids unknown keys and refuses ``.inf``/``.nan`` in float fields (an
infinite tolerance would silently switch a gate off); :data:`Seed` is a seed every RNG accepts.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1  # numpy's and random's common range; torch.manual_seed overflows past 2**64 - 1

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class StrictModel(BaseModel):
    """Unknown fields are errors; floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
