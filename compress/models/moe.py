"""Adapter for mixture-of-experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE.

All architecture knowledge the expert passes need lives here, so the pass and the pruning code
stay layout-free:

* which decoder layers are sparse (Qwen: ``mlp_only_layers`` and ``decoder_sparse_step``; Mixtral:
  all of them), read from the modules and checked against the config;
* the router of each sparse layer: ``weight [E, h]`` (+ ``bias [E]`` or ``e_score_correction_bias
  [E]`` where a class has one), its top-k and its rule (softmax → top-k, renormalised or not);
* the routed experts, either the transformers 5 fused layout (``gate_up_proj [E, 2I, h]`` with the
  gate half first, ``down_proj [E, h, I]``, layout flags from ``@use_experts_implementation``) or an
  ``nn.ModuleList`` of per-expert MLPs (the transformers 4 layout); in both the expert index is dim 0;
* the shared expert and its sigmoid gate (Qwen2-MoE), which are never pruned;
* the config keys that hold the expert count (``num_local_experts`` for Mixtral, ``num_experts`` for
  Qwen) and top-k (``num_experts_per_tok``), and the module attributes transformers reads at run time.

Counts are read from the modules, not the config, so the adapter describes pruned models correctly.
Models whose sparse layers hold different counts (``pruned_mixtral``, ``pruned_qwen2_moe``,
``pruned_qwen3_moe``, from ``compress/models/pruned_moe.py``) are read as their base family.

For export, each sparse layer also offers its static form (``MoeLayer.routing_matrix``,
``ExpertBank.all_outputs``, ``MoeLayer.shared_output``; assembled in ``moe_static.py``), and
``exporters.moe.export_moe_safetensors`` writes a stock or a pruned_moe checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.models.llama import LayerWidths
from compress.models.pruned_moe import PRUNED_MOE_MODEL_TYPES


class NotForMoe(CompressError, AttributeError):
    """A dense-model adapter feature asked of an MoE model."""


@dataclass(frozen=True)
class MoeFamily:
    """What differs between the supported MoE families.

    expert_count_key: config field with the routed-expert count.
    always_renormalises: the router renormalises its top-k weights whatever the config says (Mixtral).
    """

    expert_count_key: str
    always_renormalises: bool


MOE_FAMILIES: dict[str, MoeFamily] = {
    "mixtral": MoeFamily(expert_count_key="num_local_experts", always_renormalises=True),
    "qwen2_moe": MoeFamily(expert_count_key="num_experts", always_renormalises=False),
    "qwen3_moe": MoeFamily(expert_count_key="num_experts", always_renormalises=False),
}
# The stock families and their per-layer-count forms (compress/models/pruned_moe.py).
MOE_MODEL_TYPES = tuple(MOE_FAMILIES) + tuple(PRUNED_MOE_MODEL_TYPES)
TOP_K_KEY = "num_experts_per_tok"


def moe_base_type(config) -> str | None:
    """The stock MoE family ("mixtral", "qwen2_moe", "qwen3_moe") of a stock or pruned_moe config;
    None for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type in PRUNED_MOE_MODEL_TYPES:
        return PRUNED_MOE_MODEL_TYPES[model_type]
    return model_type if model_type in MOE_FAMILIES else None


def is_moe_model(model: nn.Module) -> bool:
    """True for a causal LM of a supported MoE family (stock, or with per-layer expert counts)."""
    return moe_base_type(getattr(model, "config", None)) is not None


# ------------------------------------------------------------------------------------ routing
@dataclass(frozen=True)
class RouterRule:
    """How a router turns logits [T, E] into top-k routing weights.

    scoring: "softmax" (fp32 softmax over all E logits).
    renormalise: the top-k weights are divided by their sum (Mixtral; Qwen with ``norm_topk_prob``).

    Slicing the router rows of the kept experts is exact ("original router with the pruned experts'
    scores at -inf before top-k") for softmax → top-k → renormalise: the ordering of the kept scores
    does not change and renormalised weights do not depend on the partition function. Without
    renormalisation the kept weights grow by Z / Z_keep (the softmax now runs over the kept experts
    only), so the rewrite is NOT exact.
    """

    scoring: str
    renormalise: bool

    @property
    def name(self) -> str:
        return f"{self.scoring} → top-k" + (" → renormalise" if self.renormalise else " (no renormalisation)")

    @property
    def exact_after_slicing(self) -> bool:
        return self.scoring == "softmax" and self.renormalise

    def route(self, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, indices [T, k]) from logits [T, E], as the HF routers compute them."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices


# ------------------------------------------------------------------------------------ experts
class ExpertBank:
    """The routed experts of one layer: E experts, each x [T, h] -> f_i(x) [T, h]."""

    layout = "abstract"

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    def expert_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """f_i(x) [T, h]: expert ``index``'s raw output (before the routing weight) on x [T, h]."""
        raise NotImplementedError

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[E, T, h]: every expert's raw output on every token of x [T, h] (a static loop over E)."""
        return torch.stack([self.expert_output(i, x) for i in range(self.num_experts)])

    def expert_width(self) -> int:
        """Intermediate width I of one expert."""
        raise NotImplementedError

    def params_per_expert(self) -> int:
        raise NotImplementedError

    def select(self, keep: torch.Tensor) -> nn.Module:
        """Keep experts ``keep`` (sorted LongTensor [K], renumbered 0..K-1 in this order); returns the
        module to install in the block (the same module, sliced in place, or a new one)."""
        raise NotImplementedError


class FusedExperts(ExpertBank):
    """transformers 5 experts: 3-D tensors whose dim 0 is the expert index.

    ``gate_up_proj [E, 2I, h]`` (``[E, h, 2I]`` when ``is_transposed``), ``down_proj [E, h, I]``
    (``[E, I, h]`` transposed), optional ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, h]``
    (``has_bias``), ``up_proj`` instead of ``gate_up_proj`` without a gate (``has_gate`` False).
    Every direct parameter and buffer of the module is per expert, so selecting experts slices
    each of them on dim 0 whatever the flags say.
    """

    layout = "fused"

    def __init__(self, module: nn.Module, layer_index: int):
        super().__init__(module)
        if getattr(module, "has_post_expert_norm", False):
            raise CompressError(f"layer {layer_index}: experts with a post-expert norm are not supported")
        count = self.num_experts
        for name, tensor in self._per_expert_tensors():
            if tensor.dim() == 0 or tensor.shape[0] != count:
                raise CompressError(
                    f"layer {layer_index}: expert tensor {name} has shape {tuple(tensor.shape)}; "
                    f"expected the expert index ({count} experts) on dim 0"
                )

    def _per_expert_tensors(self):
        yield from self.module.named_parameters(recurse=False)
        yield from self.module.named_buffers(recurse=False)

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    def _up_weight(self) -> torch.Tensor:
        return self.module.gate_up_proj if getattr(self.module, "has_gate", True) else self.module.up_proj

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if getattr(self.module, "is_transposed", False) else F.linear(x, weight)

    def expert_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        hidden = self._project(x, self._up_weight()[index])
        if getattr(m, "has_bias", False):
            bias_name = "gate_up_proj_bias" if getattr(m, "has_gate", True) else "up_proj_bias"
            hidden = hidden + getattr(m, bias_name)[index]
        if getattr(m, "has_gate", True):
            hidden = m._apply_gate(hidden) if hasattr(m, "_apply_gate") else self._chunked_gate(hidden)
        else:
            hidden = m.act_fn(hidden)
        out = self._project(hidden, m.down_proj[index])
        if getattr(m, "has_bias", False):
            out = out + m.down_proj_bias[index]
        return out

    def _chunked_gate(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = hidden.chunk(2, dim=-1)
        return self.module.act_fn(gate) * up

    def _project_all(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, in] or [E, T, in] through every expert's weight ([E, out, in], or [E, in, out] when
        transposed) -> [E, T, out], as one batched matmul."""
        if not getattr(self.module, "is_transposed", False):
            weight = weight.transpose(1, 2)
        return torch.matmul(x, weight)

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[E, T, h] from x [T, h]: the same arithmetic as ``expert_output`` for all experts at once
        (two batched matmuls; biases [E, out] broadcast over tokens)."""
        m = self.module
        has_gate, has_bias = getattr(m, "has_gate", True), getattr(m, "has_bias", False)
        hidden = self._project_all(x, self._up_weight())
        if has_bias:
            hidden = hidden + getattr(m, "gate_up_proj_bias" if has_gate else "up_proj_bias").unsqueeze(1)
        if has_gate:
            hidden = m._apply_gate(hidden) if hasattr(m, "_apply_gate") else self._chunked_gate(hidden)
        else:
            hidden = m.act_fn(hidden)
        out = self._project_all(hidden, m.down_proj)
        if has_bias:
            out = out + m.down_proj_bias.unsqueeze(1)
        return out

    def expert_width(self) -> int:
        down = self.module.down_proj
        return int(down.shape[1] if getattr(self.module, "is_transposed", False) else down.shape[2])

    def params_per_expert(self) -> int:
        return sum(t.numel() // max(t.shape[0], 1) for _, t in self.module.named_parameters(recurse=False))

    def select(self, keep: torch.Tensor) -> nn.Module:
        m = self.module
        for name, param in list(m.named_parameters(recurse=False)):
            sliced = param.detach().index_select(0, keep.to(param.device)).clone()
            setattr(m, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
        for name, buffer in list(m.named_buffers(recurse=False)):
            setattr(m, name, buffer.index_select(0, keep.to(buffer.device)).clone())
        m.num_experts = int(keep.numel())
        return m


class ExpertList(ExpertBank):
    """transformers 4 experts: an ``nn.ModuleList`` of per-expert MLPs (gate/up/down or w1/w3/w2)."""

    layout = "module_list"

    def __init__(self, module: nn.ModuleList, layer_index: int):
        super().__init__(module)
        if len(module) == 0:
            raise CompressError(f"layer {layer_index}: the expert list is empty")

    @property
    def num_experts(self) -> int:
        return len(self.module)

    def expert_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.module[index](x)

    def expert_width(self) -> int:
        expert = self.module[0]
        down = getattr(expert, "down_proj", None)
        down = down if down is not None else getattr(expert, "w2", None)
        return int(down.in_features) if down is not None else 0

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.module[0].parameters())

    def select(self, keep: torch.Tensor) -> nn.Module:
        return nn.ModuleList([self.module[i] for i in keep.tolist()])


def expert_bank(module: nn.Module, layer_index: int) -> ExpertBank:
    """The ExpertBank view of a block's ``experts`` module."""
    if isinstance(module, nn.ModuleList):
        return ExpertList(module, layer_index)
    if hasattr(module, "num_experts") and hasattr(module, "down_proj") and isinstance(module.down_proj, torch.Tensor):
        return FusedExperts(module, layer_index)
    raise CompressError(f"layer {layer_index}: unsupported experts module {type(module).__name__} "
                        "(expected fused 3-D expert tensors or an nn.ModuleList of expert MLPs)")


# ------------------------------------------------------------------------------------ one layer
@dataclass
class MoeLayer:
    """One sparse decoder layer.

    index: decoder layer index.  block: the sparse MoE block (``layer.mlp``).
    router: module with ``weight [E, h]`` (a TopKRouter, or an ``nn.Linear`` in the 4.x layout).
    experts: the routed experts.  shared: names of the block's shared-expert modules (never pruned).
    residual_input: the module whose input is h_t, the residual stream entering the MoE add
    (``post_attention_layernorm``).  rule: the routing rule.
    """

    index: int
    block: nn.Module
    router: nn.Module
    experts: ExpertBank
    shared: tuple[str, ...]
    residual_input: nn.Module
    rule: RouterRule

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        for owner in (self.router, self.block):
            if hasattr(owner, "top_k"):
                return int(owner.top_k)
        raise CompressError(f"layer {self.index}: cannot find the router's top_k")

    def routing(self, router_output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], weights [T, k] float32, indices [T, k]) from what the router returned:
        ``(logits, weights, indices)`` for the 5.x routers, logits alone for an ``nn.Linear`` router."""
        if isinstance(router_output, tuple):
            logits, weights, indices = router_output[:3]
            return logits.reshape(-1, logits.shape[-1]), weights.reshape(indices.shape).float(), indices
        logits = router_output.reshape(-1, router_output.shape[-1])
        weights, indices = self.rule.route(logits, self.top_k)
        return logits, weights, indices

    # ------------------------------------------------------------------ static (export) form
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] from x [T, h]: ``x @ weight.T (+ bias)``, the router's own linear."""
        router = self.router
        if isinstance(router, nn.Linear):
            return router(x)
        if getattr(router, "e_score_correction_bias", None) is not None:
            raise CompressError(f"layer {self.index}: routers with a score-correction bias (group-limited sigmoid "
                                "routing) have no static form yet")
        return F.linear(x, router.weight, getattr(router, "bias", None))

    def routing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Dense routing weights [T, E] float32 from x [T, h]: each token's top-k weights, chosen and
        (if the rule says so) renormalised exactly as the router does, at their experts' columns;
        zero for every expert the router did not pick. Static: torch.topk and a scatter, no
        data-dependent loop."""
        if self.rule.scoring != "softmax":
            raise CompressError(f"layer {self.index}: no static form for {self.rule.scoring} routing")
        logits = self.router_logits(x)
        weights, indices = self.rule.route(logits, self.top_k)
        return torch.zeros(logits.shape, dtype=weights.dtype, device=logits.device).scatter(1, indices, weights)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' contribution [T, h] on x [T, h] (None without one): Qwen2-MoE's
        ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; an ungated ``shared_experts(x)``."""
        if not self.shared:
            return None
        if "shared_experts" in self.shared:
            return self.block.shared_experts(x)
        out = self.block.shared_expert(x)
        if "shared_expert_gate" in self.shared:
            out = torch.sigmoid(self.block.shared_expert_gate(x)) * out
        return out

    def slice_router(self, keep: torch.Tensor) -> None:
        """Keep router rows ``keep`` (weight, bias, score-correction bias) and update its count."""
        router = self.router
        if isinstance(router, nn.Linear):
            new = nn.Linear(router.in_features, int(keep.numel()), bias=router.bias is not None,
                            device=router.weight.device, dtype=router.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(router.weight.index_select(0, keep.to(router.weight.device)))
                if router.bias is not None:
                    new.bias.copy_(router.bias.index_select(0, keep.to(router.weight.device)))
            new.weight.requires_grad_(router.weight.requires_grad)
            self.block.gate = self.router = new
            return
        for name in ("weight", "bias", "e_score_correction_bias"):
            tensor = getattr(router, name, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            sliced = tensor.detach().index_select(0, keep.to(tensor.device)).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(router, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
            else:
                setattr(router, name, sliced)
        if hasattr(router, "num_experts"):
            router.num_experts = int(keep.numel())

    def select_experts(self, keep: torch.Tensor) -> None:
        """Keep routed experts ``keep`` (sorted) and the matching router rows; shared experts stay."""
        module = self.experts.select(keep)
        if module is not self.experts.module:
            self.block.experts = module
        self.experts = expert_bank(module, self.index)
        self.slice_router(keep)
        if hasattr(self.block, "num_experts"):
            self.block.num_experts = int(keep.numel())

    def set_top_k(self, top_k: int) -> None:
        for owner in (self.router, self.block):
            if hasattr(owner, "top_k"):
                owner.top_k = int(top_k)


@dataclass(frozen=True)
class MoeLayerWidths(LayerWidths):
    """Widths of one decoder layer of an MoE model.

    heads / kv_heads: attention heads.  intermediate: routed MLP channels (experts × expert width) in
    a sparse layer, the MLP width in a dense one.  experts: routed experts (0 in a dense layer).
    top_k: experts per token (0 in a dense layer).
    """

    experts: int
    top_k: int


# ------------------------------------------------------------------------------------ the adapter
class MoeAdapter:
    """Names the parts of a Mixtral / Qwen2-MoE / Qwen3-MoE causal LM and prices its experts.

    Prunable group: one routed expert of one sparse layer (its slice of every expert tensor and
    its router row). Shared experts and dense MLP layers are not groups.
    """

    def __init__(self, model: nn.Module):
        model_type = moe_base_type(getattr(model, "config", None))
        if model_type is None or not hasattr(model, "model"):
            found = getattr(getattr(model, "config", None), "model_type", None)
            raise CompressError(f"no MoE adapter for model type {found!r}; supported: {', '.join(MOE_MODEL_TYPES)}")
        self.model = model
        self.config = model.config
        self.family = MOE_FAMILIES[model_type]
        self.model_type = model_type  # the stock family, also for a pruned_* model
        self.decoder = model.model
        self.layers: nn.ModuleList = model.model.layers
        self.head_dim: int = int(self.layers[0].self_attn.head_dim)
        self.hidden_size: int = int(self.decoder.embed_tokens.weight.shape[1])
        self._moe = {i: self._read_layer(i) for i in range(len(self.layers))}
        self._moe = {i: layer for i, layer in self._moe.items() if layer is not None}
        if not self._moe:
            raise CompressError(f"{type(model).__name__} has no sparse MoE layer")

    # ------------------------------------------------------------------------------- layers
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def config_says_sparse(self, index: int) -> bool:
        """The config's rule: Qwen skips ``mlp_only_layers`` and uses every ``decoder_sparse_step``-th
        layer; Mixtral is sparse everywhere."""
        c = self.config
        if index in (getattr(c, "mlp_only_layers", None) or []):
            return False
        step = getattr(c, "decoder_sparse_step", 1) or 1
        return (index + 1) % step == 0

    def _read_layer(self, index: int) -> MoeLayer | None:
        layer = self.layers[index]
        block = layer.mlp
        sparse = hasattr(block, "experts") and hasattr(block, "gate")
        if sparse != self.config_says_sparse(index):
            raise CompressError(
                f"layer {index}: the module is {'sparse' if sparse else 'dense'} but the config "
                "(mlp_only_layers / decoder_sparse_step) says otherwise"
            )
        if not sparse:
            return None
        router = block.gate
        experts = expert_bank(block.experts, index)
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != experts.num_experts:
            raise CompressError(
                f"layer {index}: router {type(router).__name__} needs a weight [E, h] with E = "
                f"{experts.num_experts} experts (got {None if weight is None else tuple(weight.shape)})"
            )
        shared = tuple(name for name in ("shared_expert", "shared_expert_gate", "shared_experts")
                       if getattr(block, name, None) is not None)
        return MoeLayer(index=index, block=block, router=router, experts=experts, shared=shared,
                        residual_input=layer.post_attention_layernorm, rule=self._router_rule(block, router))

    def _router_rule(self, block: nn.Module, router: nn.Module) -> RouterRule:
        if self.family.always_renormalises:
            return RouterRule("softmax", True)
        for owner in (router, block, self.config):
            if hasattr(owner, "norm_topk_prob"):
                return RouterRule("softmax", bool(owner.norm_topk_prob))
        return RouterRule("softmax", False)

    def moe_layers(self) -> list[MoeLayer]:
        """The sparse layers, in order."""
        return [self._moe[i] for i in sorted(self._moe)]

    def moe_layer(self, index: int) -> MoeLayer | None:
        return self._moe.get(index)

    def expert_counts(self) -> dict[int, int]:
        """Sparse layer index -> routed experts it holds."""
        return {layer.index: layer.num_experts for layer in self.moe_layers()}

    def num_experts_per_layer(self) -> list[int]:
        """Routed experts of every decoder layer, 0 for a dense MLP layer (``num_experts_per_layer``
        of a pruned_moe config)."""
        counts = self.expert_counts()
        return [counts.get(i, 0) for i in range(self.num_layers)]

    def top_k(self) -> int:
        """The experts-per-token shared by all sparse layers (a config holds one)."""
        top_ks = sorted({layer.top_k for layer in self.moe_layers()})
        if len(top_ks) != 1:
            raise CompressError(f"the sparse layers route different numbers of experts per token {top_ks}; "
                                f"a config holds one `{TOP_K_KEY}`")
        return top_ks[0]

    def attention(self, layer_index: int) -> nn.Module:
        return self.layers[layer_index].self_attn

    def mlp(self, layer_index: int) -> nn.Module:
        return self.layers[layer_index].mlp

    def attention_linears(self, layer_index: int) -> dict[str, nn.Linear]:
        attn = self.attention(layer_index)
        return {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj}

    def __getattr__(self, name: str):
        """The LLaMA adapter's API that an MoE model lacks (MLP channels, consumers, …): a clear error
        for the passes that need it (also an AttributeError, so ``hasattr`` stays False)."""
        from compress.models.llama import LlamaFamilyAdapter

        if not name.startswith("_") and hasattr(LlamaFamilyAdapter, name):
            raise NotForMoe(
                f"{type(self.__dict__.get('model')).__name__} is a mixture-of-experts model: this pass needs the "
                f"dense LLaMA adapter's `{name}`, which MoE models do not provide; prune experts with the "
                "`moe_experts` pass"
            )
        raise AttributeError(name)

    # ------------------------------------------------------------------------------- config
    def sync_config(self) -> bool:
        """Write the modules' expert count and top-k into the config (and the attributes the causal
        LM copied from it) when every sparse layer agrees; returns whether they agree."""
        counts = {layer.num_experts for layer in self.moe_layers()}
        top_ks = {layer.top_k for layer in self.moe_layers()}
        if len(counts) != 1 or len(top_ks) != 1:
            return False
        count, top_k = counts.pop(), top_ks.pop()
        setattr(self.config, self.family.expert_count_key, count)
        setattr(self.config, TOP_K_KEY, top_k)
        if hasattr(self.config, "num_experts_per_layer"):  # a pruned_moe config
            self.config.num_experts_per_layer = self.num_experts_per_layer()
        if hasattr(self.model, "num_experts"):
            self.model.num_experts = count
        if hasattr(self.model, "num_experts_per_tok"):
            self.model.num_experts_per_tok = top_k
        return True

    # ------------------------------------------------------------------------------- widths
    def widths(self, layer_index: int) -> MoeLayerWidths:
        attn = self.attention(layer_index)
        heads = attn.q_proj.out_features // self.head_dim
        kv_heads = attn.k_proj.out_features // self.head_dim
        moe = self._moe.get(layer_index)
        if moe is None:
            mlp = self.mlp(layer_index)
            return MoeLayerWidths(heads, kv_heads, int(mlp.gate_proj.out_features), 0, 0)
        return MoeLayerWidths(heads, kv_heads, moe.num_experts * moe.experts.expert_width(), moe.num_experts, moe.top_k)

    def all_widths(self) -> list[MoeLayerWidths]:
        return [self.widths(i) for i in range(self.num_layers)]

    def expert_cost(self, layer_index: int) -> int:
        """Parameters removed with one routed expert: its expert tensors' slice and its router row."""
        moe = self._moe[layer_index]
        router_row = moe.router.weight.shape[1] + (1 if getattr(moe.router, "bias", None) is not None else 0)
        return moe.experts.params_per_expert() + router_row

    # ---------------------------------------------------------------------- parameter counts
    def decoder_linear_params(self) -> int:
        """Matrix weights (dim >= 2) of attention and MLP blocks over all layers: q/k/v/o, routers,
        routed experts, shared experts and their gates, dense MLPs."""
        total = 0
        for i in range(self.num_layers):
            for module in (self.attention(i), self.mlp(i)):
                total += sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        return total

    def param_counts(self) -> dict[str, int]:
        """Parameters by part (tied embeddings counted once), with the routed experts, routers and
        shared experts of the sparse layers broken out, and the parameters active per token."""
        from compress.models.llama import part_counts

        counts = part_counts(self)
        layers = self.moe_layers()
        inactive = sum((layer.num_experts - layer.top_k) * layer.experts.params_per_expert() for layer in layers)
        return {
            **counts,
            "routed_experts": sum(sum(p.numel() for p in layer.experts.module.parameters()) for layer in layers),
            "routers": sum(sum(p.numel() for p in layer.router.parameters()) for layer in layers),
            "shared_experts": sum(sum(p.numel() for p in getattr(layer.block, name).parameters())
                                  for layer in layers for name in layer.shared),
            "active_per_token": counts["total"] - inactive,
        }

    def summary(self) -> dict:
        """What `compress inspect` prints: architecture, parameters by part, prunable groups."""
        first = self.moe_layers()[0]
        return {
            "architecture": type(self.model).__name__,
            "family": self.config.model_type,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "params": self.param_counts(),
            "groups": [{
                "kind": "expert",
                "per_layer": first.num_experts,
                "cost_params": self.expert_cost(first.index),
                "description": f"one routed expert ({first.experts.layout} layout) + its router row; "
                               f"router {first.rule.name}, top-{first.top_k}"
                               + (f"; shared: {', '.join(first.shared)} (never pruned)" if first.shared else ""),
            }],
            "layer_widths": [{"index": i, **w.__dict__} for i, w in enumerate(self.all_widths())],
        }
