"""Mixture-of-experts decoders whose sparse layers hold different numbers of routed experts.

This file is self-contained on purpose: it imports only torch, transformers (and huggingface_hub,
which transformers itself needs) and the standard library, because the exporter copies it verbatim
next to the weights so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads an expert-pruned model on a machine without the `compress` package. Importing it (which
`import compress` does) registers the three model types below with `AutoConfig` /
`AutoModelForCausalLM`, so the same folder also loads without `trust_remote_code` when `compress`
is importable.

Supported bases (`base_model_type`) and the model type of their pruned form:

    mixtral   -> pruned_mixtral     (MixtralForCausalLM)
    qwen2_moe -> pruned_qwen2_moe   (Qwen2MoeForCausalLM, shared expert kept)
    qwen3_moe -> pruned_qwen3_moe   (Qwen3MoeForCausalLM)

Each config is a subclass of the base config with two more fields: `base_model_type` and
`num_experts_per_layer`, one entry per decoder layer (0 for a dense MLP layer). The model is the
stock causal LM built from this config, with the scalar expert count (`num_local_experts` /
`num_experts`, the per-layer maximum) sizing a throw-away scaffold; then every sparse block keeps
its first E_i experts, E_i = num_experts_per_layer[i]:

    mlp.gate.weight               [E_i, h]
    mlp.experts.gate_up_proj      [E_i, 2I, h]     (gate half first)
    mlp.experts.down_proj         [E_i, h, I]

Everything else (attention, router rule, top-k, shared expert, norms, rotary embedding, caches)
is the base's own code. The checkpoint uses the base's hub layout (one tensor per expert, e.g.
Mixtral's `block_sparse_moe.experts.{j}.w1/w2/w3.weight`, Qwen's `mlp.experts.{j}.gate_proj/
up_proj/down_proj.weight`): this file registers the base's checkpoint conversion for its model
types, so transformers fuses them on load exactly as for the base. The router-logits auxiliary loss
(`output_router_logits`) assumes one expert count and is not supported.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

__all__ = [
    "PRUNED_MOE_MODEL_TYPES",
    "PrunedMixtralConfig",
    "PrunedMixtralForCausalLM",
    "PrunedQwen2MoeConfig",
    "PrunedQwen2MoeForCausalLM",
    "PrunedQwen3MoeConfig",
    "PrunedQwen3MoeForCausalLM",
    "pruned_moe_classes",
    "resize_sparse_blocks",
]

# Base model_type -> config field holding the routed-expert count.
EXPERT_COUNT_KEYS = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}


class PerLayerExperts:
    """What the three pruned configs share: the per-layer expert counts, filled and checked.

    Not a dataclass: each config declares the fields `base_model_type` and `num_experts_per_layer`
    itself (dataclass fields must be declared on the dataclass).
    """

    @property
    def expert_count_key(self) -> str:
        return EXPERT_COUNT_KEYS[self.base_model_type]

    def is_sparse_layer(self, layer: int) -> bool:
        """The base's rule: Mixtral is sparse everywhere; Qwen skips `mlp_only_layers` and uses every
        `decoder_sparse_step`-th layer."""
        if layer in (getattr(self, "mlp_only_layers", None) or []):
            return False
        step = getattr(self, "decoder_sparse_step", 1) or 1
        return (layer + 1) % step == 0

    def fill_expert_counts(self) -> None:
        """A list left out is the scalar count in every sparse layer (a dense MoE model)."""
        if self.num_experts_per_layer is None:
            count = getattr(self, self.expert_count_key)
            self.num_experts_per_layer = [
                count if self.is_sparse_layer(layer) else 0 for layer in range(self.num_hidden_layers)
            ]

    def validate_expert_counts(self):
        """Part of `@strict` validation: one entry per layer, 0 exactly for the dense layers, and in
        a sparse layer at least `num_experts_per_tok` and at most the scalar count (the scaffold)."""
        name = type(self).__name__
        expected = self.base_model_type_of_class
        if self.base_model_type != expected:
            raise ValueError(f"{name}.base_model_type must be {expected!r}, got {self.base_model_type!r}.")
        counts = self.num_experts_per_layer
        if len(counts) != self.num_hidden_layers:
            raise ValueError(
                f"{name}.num_experts_per_layer has {len(counts)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}."
            )
        scaffold, top_k = getattr(self, self.expert_count_key), self.num_experts_per_tok
        for layer, count in enumerate(counts):
            if not self.is_sparse_layer(layer):
                if count != 0:
                    raise ValueError(
                        f"{name}.num_experts_per_layer[{layer}] is {count}, but layer {layer} is a dense MLP "
                        "layer (mlp_only_layers / decoder_sparse_step) and must be 0."
                    )
            elif not top_k <= count <= scaffold:
                raise ValueError(
                    f"{name}.num_experts_per_layer[{layer}] is {count}; a sparse layer needs at least "
                    f"num_experts_per_tok = {top_k} experts and at most {self.expert_count_key} = {scaffold}."
                )

    def to_diff_dict(self) -> dict:
        """config.json always names the base and the per-layer counts, even where they are defaults."""
        values = super().to_diff_dict()
        values["base_model_type"] = self.base_model_type
        values["num_experts_per_layer"] = list(self.num_experts_per_layer)
        return values


@strict
class PrunedMixtralConfig(PerLayerExperts, MixtralConfig):
    r"""Mixtral with per-layer routed-expert counts.

    Extra fields (beyond `MixtralConfig`):
        base_model_type: "mixtral".
        num_experts_per_layer: list[int], num_hidden_layers entries (routed experts of layer i).
    `num_local_experts` is the largest entry; it only sizes the scaffold.
    """

    model_type = "pruned_mixtral"
    base_model_type_of_class = "mixtral"

    base_model_type: str = "mixtral"
    num_experts_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.fill_expert_counts()


@strict
class PrunedQwen2MoeConfig(PerLayerExperts, Qwen2MoeConfig):
    r"""Qwen2-MoE (Qwen1.5-MoE) with per-layer routed-expert counts; the shared expert is unchanged.

    Extra fields (beyond `Qwen2MoeConfig`):
        base_model_type: "qwen2_moe".
        num_experts_per_layer: list[int], num_hidden_layers entries (0 for a dense MLP layer).
    `num_experts` is the largest entry; it only sizes the scaffold.
    """

    model_type = "pruned_qwen2_moe"
    base_model_type_of_class = "qwen2_moe"

    base_model_type: str = "qwen2_moe"
    num_experts_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.fill_expert_counts()


@strict
class PrunedQwen3MoeConfig(PerLayerExperts, Qwen3MoeConfig):
    r"""Qwen3-MoE with per-layer routed-expert counts.

    Extra fields (beyond `Qwen3MoeConfig`):
        base_model_type: "qwen3_moe".
        num_experts_per_layer: list[int], num_hidden_layers entries (0 for a dense MLP layer).
    `num_experts` is the largest entry; it only sizes the scaffold.
    """

    model_type = "pruned_qwen3_moe"
    base_model_type_of_class = "qwen3_moe"

    base_model_type: str = "qwen3_moe"
    num_experts_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.fill_expert_counts()


# ------------------------------------------------------------------------------------ the models
def _keep_first(module: nn.Module, count: int, what: str) -> None:
    """Slice every direct parameter and buffer of `module` to its first `count` rows (dim 0 is the
    expert index) and set its `num_experts`. Works under the meta device (`from_pretrained`)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() == 0 or param.shape[0] < count:
            raise ValueError(f"{what}.{name} has shape {tuple(param.shape)}; cannot keep {count} experts on dim 0")
        setattr(module, name, nn.Parameter(param.data[:count].clone(), requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        module.register_buffer(name, buffer[:count].clone(), persistent=name not in module._non_persistent_buffers_set)
    if hasattr(module, "num_experts"):
        module.num_experts = count


def resize_sparse_blocks(decoder: nn.Module, config: PerLayerExperts) -> None:
    """Give sparse layer i of `decoder` (a stock MixtralModel / Qwen2MoeModel / Qwen3MoeModel) its
    first E_i = config.num_experts_per_layer[i] experts: router `weight [E_i, h]`, expert tensors
    `[E_i, ...]`, and `num_experts` on router, experts and block. Dense layers stay as built."""
    for index, layer in enumerate(decoder.layers):
        block, count = layer.mlp, config.num_experts_per_layer[index]
        sparse = hasattr(block, "experts") and hasattr(block, "gate")
        if sparse != (count > 0):
            raise ValueError(
                f"decoder layer {index} is {'sparse' if sparse else 'dense'} but num_experts_per_layer[{index}] "
                f"is {count}"
            )
        if not sparse:
            continue
        _keep_first(block.gate, count, f"layers.{index}.mlp.gate")
        _keep_first(block.experts, count, f"layers.{index}.mlp.experts")
        if hasattr(block, "num_experts"):
            block.num_experts = count


class _PerLayerExpertsModel:
    """Mixed into each stock causal LM: rebuild the sparse blocks after the stock constructor."""

    def __init__(self, config):
        super().__init__(config)
        resize_sparse_blocks(self.model, config)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this from the class's source file (looking for the experts decorator);
        # the experts modules here are the base's own decorated classes, so the base's kernels apply.
        return True


class PrunedMixtralForCausalLM(_PerLayerExpertsModel, MixtralForCausalLM):
    """MixtralForCausalLM whose layer i holds num_experts_per_layer[i] routed experts."""

    config_class = PrunedMixtralConfig


class PrunedQwen2MoeForCausalLM(_PerLayerExpertsModel, Qwen2MoeForCausalLM):
    """Qwen2MoeForCausalLM whose sparse layer i holds num_experts_per_layer[i] routed experts."""

    config_class = PrunedQwen2MoeConfig


class PrunedQwen3MoeForCausalLM(_PerLayerExpertsModel, Qwen3MoeForCausalLM):
    """Qwen3MoeForCausalLM whose sparse layer i holds num_experts_per_layer[i] routed experts."""

    config_class = PrunedQwen3MoeConfig


# Base model_type -> (config class, causal-LM class) of its pruned form.
_CLASSES = {
    "mixtral": (PrunedMixtralConfig, PrunedMixtralForCausalLM),
    "qwen2_moe": (PrunedQwen2MoeConfig, PrunedQwen2MoeForCausalLM),
    "qwen3_moe": (PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM),
}
# Pruned model_type -> base model_type.
PRUNED_MOE_MODEL_TYPES = {config.model_type: base for base, (config, _) in _CLASSES.items()}


def pruned_moe_classes(base_model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the pruned form of `base_model_type`."""
    if base_model_type not in _CLASSES:
        raise ValueError(
            f"no pruned MoE classes for base_model_type {base_model_type!r}; supported: {sorted(_CLASSES)}"
        )
    return _CLASSES[base_model_type]


def _loaded_as_remote_code() -> bool:
    """True for the copy transformers imports from a model folder (`trust_remote_code=True`)."""
    return __name__.startswith(f"{TRANSFORMERS_DYNAMIC_MODULE_NAME}.")


def _register_with_auto_classes() -> None:
    """Map each pruned model_type to its classes and mark them for `auto_map` on save."""
    for config_class, model_class in _CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModelForCausalLM")


def _register_checkpoint_layouts() -> None:
    """Load and save each pruned model type with its base's conversion (per-expert tensors on disk,
    fused 3-D tensors in memory). The remote-code copy needs it too: transformers applies no
    conversion to custom code unless its model type was registered."""
    for base, (config_class, _) in _CLASSES.items():
        register_checkpoint_conversion_mapping(
            config_class.model_type, get_checkpoint_conversion_mapping(base), overwrite=True
        )


_register_checkpoint_layouts()
# A remote-code copy leaves the Auto-class registry alone (see pruned_llama.py).
if not _loaded_as_remote_code():
    _register_with_auto_classes()
