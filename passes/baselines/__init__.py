"""The ``magnitude_sp`` and ``wanda_sp`` passes, declared: names, options and what they need (light;
run by passes.baselines)."""

from __future__ import annotations

from pydantic import Field

from compress.registry import register_pass
from passes._common import ALLOCATOR_HELP, AllocatorName, StructuredOptions


class BaselineOptions(StructuredOptions):
    allocator: AllocatorName = Field("uniform", description=ALLOCATOR_HELP + " Default: uniform, as published.")


@register_pass("magnitude_sp", implementation="passes.baselines.run:MagnitudeSpPass")
class MagnitudeSp:
    """magnitude-sp: drop the units whose consumer columns have the smallest L2 norm. Data-free.

    A head scores the sum of its o_proj column norms, a channel its down_proj column norm. No bias.
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = False
    streams = True  # runs out of core (max_memory), block by block

    class Options(BaselineOptions):
        pass


@register_pass("wanda_sp", implementation="passes.baselines.run:WandaSpPass")
class WandaSp:
    """Wanda-sp: |W| times input norm, averaged per channel; layers pruned in sequence. No bias.

    Each layer is scored on the outputs of the already-pruned layers before it, as in the
    reference implementation (``sequential: false`` scores everything on the dense model).
    """

    kinds = ("decoder",)  # the model kinds it works on (compress.kinds)
    needs_calibration = True
    streams = True  # runs out of core (max_memory), block by block

    class Options(BaselineOptions):
        sequential: bool = Field(True, description="Score each layer on the outputs of the pruned layers before it.")
