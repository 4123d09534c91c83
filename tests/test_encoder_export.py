"""exporters.encoder on tiny random encoders (hidden 32, 3 layers, 4 heads of 8, FFN 64): BERT, ViT,
DINOv2, CLIP text and CLIP vision, head- and channel-pruned by the encoder surgeon.

Checked: the safetensors export reloads with `AutoModel.from_pretrained` (and with remote code in a
fresh interpreter that cannot import compress) to the same last_hidden_state; dense models keep
their stock config; the ONNX graph (dynamic batch / sequence) matches PyTorch in ONNX Runtime,
padding included. Exports are built once per module (ONNX tracing is the slow part).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

from compress.errors import CompressError
from compress.models.encoder import EncoderAdapter
from compress.models.pruned_encoder import PRUNED_CLASSES
from compress.plan import LayerPlan, PlanStep
from compress.pruning.encoder_surgeon import apply_encoder_step, record_widths
from exporters.encoder import (
    encoder_config,
    encoder_onnx_parity,
    export_encoder_onnx,
    export_encoder_safetensors,
    sample_encoder_inputs,
)
from conftest import run_without_compress

# A layer with no heads is built as Linear(hidden, 0) before its attention is removed.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")

FAMILIES = ["bert", "vit", "dinov2", "clip_text_model", "clip_vision_model"]
STOCK_CLASSES = {"bert": BertModel, "vit": ViTModel, "dinov2": Dinov2Model, "clip_text_model": CLIPTextModel,
                 "clip_vision_model": CLIPVisionModel}
HIDDEN, LAYERS, HEADS, HEAD_DIM, FFN = 32, 3, 4, 8, 64
RELOAD_TOLERANCE, ONNX_TOLERANCE = 1e-5, 1e-4
PER_LAYER_KEYS = ("num_attention_heads_per_layer", "intermediate_size_per_layer", "attention_head_dim",
                  "base_model_type")

# Per layer: (kept heads, number of kept FFN channels). Layer 0 loses its attention entirely.
NON_UNIFORM = [([], 10), ([1, 3], 22), ([0, 2, 3], 40)]
UNIFORM_HEADS = [([0, 2], FFN), ([1, 3], FFN), ([2, 3], FFN)]  # 2 of 4 heads everywhere: head_dim stays 8


# ------------------------------------------------------------------------------------ tiny models
def tiny_config(family: str):
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    vision = dict(image_size=32, patch_size=8, **common)
    if family == "bert":
        return BertConfig(vocab_size=100, max_position_embeddings=64, intermediate_size=FFN, **common)
    if family == "vit":
        return ViTConfig(intermediate_size=FFN, **vision)
    if family == "dinov2":
        return Dinov2Config(mlp_ratio=FFN // HIDDEN, **vision)
    if family == "clip_text_model":
        return CLIPTextConfig(vocab_size=100, max_position_embeddings=64, intermediate_size=FFN, bos_token_id=0,
                              eos_token_id=2, pad_token_id=1, **common)
    return CLIPVisionConfig(intermediate_size=FFN, **vision)


def tiny_encoder(family: str, seed: int = 0) -> torch.nn.Module:
    """A random encoder with weights wide enough (std 0.2, biases 0.1) that every part matters."""
    torch.manual_seed(seed)
    model = STOCK_CLASSES[family](tiny_config(family)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def prune(model: torch.nn.Module, cuts, seed: int = 1) -> torch.nn.Module:
    """Slice heads and (random) FFN channels layer by layer with the surgeon; records the widths."""
    generator = torch.Generator().manual_seed(seed)
    layers = [
        LayerPlan(index, keep_heads=list(heads),
                  keep_channels=sorted(torch.randperm(FFN, generator=generator)[:channels].tolist()))
        for index, (heads, channels) in enumerate(cuts)
    ]
    apply_encoder_step(EncoderAdapter(model), PlanStep("test", {}, layers))
    return model.eval()


def hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def reload(folder: Path) -> torch.nn.Module:
    """AutoModel.from_pretrained with the loading report checked."""
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------------------------ fixtures
class Exports:
    """Pruned models and their exports, built once per module and on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[tuple[str, str], torch.nn.Module] = {}
        self.results: dict[tuple[str, str], dict] = {}

    def model(self, family: str, kind: str = "non_uniform") -> torch.nn.Module:
        key = (family, kind)
        if key not in self.models:
            model = tiny_encoder(family)
            self.models[key] = {"non_uniform": lambda: prune(model, NON_UNIFORM),
                                "uniform_heads": lambda: prune(model, UNIFORM_HEADS),
                                "dense": lambda: model}[kind]()
        return self.models[key]

    def folder(self, family: str, kind: str = "non_uniform") -> Path:
        """model exported to safetensors (distinct folder names: remote code is cached by name)."""
        key = (family, kind)
        folder = self.root / f"{family}-{kind}"
        if key not in self.results:
            self.results[key] = export_encoder_safetensors(self.model(family, kind), None, folder)
        return folder

    def result(self, family: str, kind: str = "non_uniform") -> dict:
        self.folder(family, kind)
        return self.results[(family, kind)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, one_thread) -> Exports:
    return Exports(tmp_path_factory.mktemp("encoder-exports"))


# ------------------------------------------------------------------------------------ (a) reload
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_export_reloads_with_the_pruned_class(family, exports):
    model, folder, result = exports.model(family), exports.folder(family), exports.result(family)
    config_class, model_class = PRUNED_CLASSES[family]
    assert result == {"config_class": config_class.__name__,
                      "files": ["config.json", "model.safetensors", "pruned_encoder.py", "token_pruning.py"]}

    config = read_config(folder)
    assert config["model_type"] == config_class.model_type and config["base_model_type"] == family
    assert config["num_attention_heads_per_layer"] == [len(heads) for heads, _ in NON_UNIFORM]
    assert config["intermediate_size_per_layer"] == [channels for _, channels in NON_UNIFORM]
    assert config["attention_head_dim"] == HEAD_DIM and config["num_attention_heads"] == HEADS
    assert config["auto_map"] == {"AutoConfig": f"pruned_encoder.{config_class.__name__}",
                                  "AutoModel": f"pruned_encoder.{model_class.__name__}"}
    assert config["architectures"] == [model_class.__name__]

    reloaded = reload(folder)
    assert type(reloaded) is model_class
    assert EncoderAdapter(reloaded).all_widths() == EncoderAdapter(model).all_widths()
    inputs = sample_encoder_inputs(model, batch=3, seq=12)
    torch.testing.assert_close(hidden_states(reloaded, inputs), hidden_states(model, inputs),
                               rtol=0, atol=RELOAD_TOLERANCE)


def test_stale_config_widths_are_not_trusted(exports, tmp_path):
    model = exports.model("bert")
    model.config.num_attention_heads_per_layer = [4, 4, 4]  # stale: the modules say [0, 2, 3]
    try:
        assert encoder_config(model).num_attention_heads_per_layer == [0, 2, 3]
    finally:
        record_widths(EncoderAdapter(model))


def test_reexporting_a_reloaded_pruned_model_round_trips(exports, tmp_path):
    first = reload(exports.folder("vit"))
    result = export_encoder_safetensors(first, None, tmp_path)
    assert result["config_class"] == "PrunedViTConfig"
    assert read_config(tmp_path)["num_attention_heads_per_layer"] == [0, 2, 3]
    inputs = sample_encoder_inputs(first)
    torch.testing.assert_close(hidden_states(reload(tmp_path), inputs), hidden_states(first, inputs), rtol=0, atol=0)


# ------------------------------------------------------------------------------- (c) dense models
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_model_exports_its_stock_config(family, exports):
    model = exports.model(family, "dense")
    record_widths(EncoderAdapter(model))  # a pass that pruned nothing still leaves its attributes
    folder, result = exports.folder(family, "dense"), exports.result(family, "dense")
    stock = STOCK_CLASSES[family]

    assert result == {"config_class": type(model.config).__name__, "files": ["config.json", "model.safetensors"]}
    config = read_config(folder)
    assert config["model_type"] == family and config["architectures"] == [stock.__name__]
    assert not set(PER_LAYER_KEYS) & set(config) and "auto_map" not in config
    assert hasattr(model.config, "num_attention_heads_per_layer")  # the model's own config is untouched

    reloaded = reload(folder)
    assert type(reloaded) is stock
    inputs = sample_encoder_inputs(model)
    torch.testing.assert_close(hidden_states(reloaded, inputs), hidden_states(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_dense_model_of_a_pruned_class_goes_back_to_the_stock_config(family, tmp_path):
    config_class, model_class = PRUNED_CLASSES[family]
    values = {key: value for key, value in tiny_config(family).to_diff_dict().items() if key != "model_type"}
    torch.manual_seed(0)
    model = model_class(config_class(**values, base_model_type=family)).eval()
    result = export_encoder_safetensors(model, None, tmp_path)

    config = read_config(tmp_path)
    assert result["config_class"] == type(tiny_config(family)).__name__ and config["model_type"] == family
    assert not set(PER_LAYER_KEYS) & set(config)
    if family == "dinov2":
        assert "intermediate_size" not in config
    reloaded = reload(tmp_path)
    assert type(reloaded) is STOCK_CLASSES[family]
    inputs = sample_encoder_inputs(model)
    torch.testing.assert_close(hidden_states(reloaded, inputs), hidden_states(model, inputs), rtol=0, atol=0)


# ---------------------------------------------------------------------- (e) uniform head pruning
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_uniform_head_pruning_needs_the_pruned_config(family, exports):
    model, folder = exports.model(family, "uniform_heads"), exports.folder(family, "uniform_heads")
    assert exports.result(family, "uniform_heads")["config_class"] == PRUNED_CLASSES[family][0].__name__

    config = read_config(folder)
    assert config["num_attention_heads_per_layer"] == [2, 2, 2] and config["intermediate_size_per_layer"] == [FFN] * 3
    assert config["attention_head_dim"] == HEAD_DIM  # a stock config with 2 heads would mean head size 16
    reloaded = reload(folder)
    assert all(w.heads == 2 for w in EncoderAdapter(reloaded).all_widths())
    inputs = sample_encoder_inputs(model)
    torch.testing.assert_close(hidden_states(reloaded, inputs), hidden_states(model, inputs),
                               rtol=0, atol=RELOAD_TOLERANCE)


# -------------------------------------------------------------------------------- (b) remote code
REMOTE_SCRIPT = """
import json, sys
sys.modules["compress"] = None  # an installed compress would make the check vacuous
sys.modules["exporters"] = None
import torch
from transformers import AutoModel
for folder, inputs_file, output_file in json.load(open(sys.argv[1])):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model).__name__.startswith("Pruned"), type(model).__name__
    with torch.no_grad():
        torch.save(model(**torch.load(inputs_file)).last_hidden_state, output_file)
assert not [name for name in sys.modules if name.startswith(("compress.", "exporters."))]
"""


def test_remote_code_loads_without_compress(exports, tmp_path):
    """Every pruned export, in one fresh interpreter with `compress` made unimportable."""
    cases = [(family, "non_uniform") for family in FAMILIES] + [("bert", "uniform_heads")]
    jobs, expected = [], {}
    for family, kind in cases:
        model = exports.model(family, kind)
        inputs = sample_encoder_inputs(model, batch=3, seq=12, seed=2)
        inputs_file, output_file = tmp_path / f"{family}-{kind}-in.pt", tmp_path / f"{family}-{kind}-out.pt"
        torch.save(inputs, inputs_file)
        jobs.append([str(exports.folder(family, kind)), str(inputs_file), str(output_file)])
        expected[output_file] = hidden_states(model, inputs)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    run_without_compress(REMOTE_SCRIPT, [str(tmp_path / "jobs.json")], tmp_path)
    for output_file, reference in expected.items():
        torch.testing.assert_close(torch.load(output_file), reference, rtol=0, atol=RELOAD_TOLERANCE)


# ----------------------------------------------------------------------------------- (d) ONNX
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_matches_pytorch(family, exports, tmp_path):
    model = exports.model(family)
    result = export_encoder_onnx(model, tmp_path)

    text = family in ("bert", "clip_text_model")
    expected_inputs = {"bert": ["input_ids", "attention_mask", "token_type_ids"],
                       "clip_text_model": ["input_ids", "attention_mask"]}.get(family, ["pixel_values"])
    assert result["inputs"] == expected_inputs and result["outputs"] == ["last_hidden_state"]
    assert result["files"] == ["model.onnx"] and result["bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert result["nodes"] > 0
    # Batch and sequence differ from the trace's (2 x 8); text rows are padded.
    inputs = sample_encoder_inputs(model, batch=3, seq=13, seed=3)
    if text:
        assert (inputs["attention_mask"] == 0).any()
    parity = encoder_onnx_parity(model, tmp_path / "model.onnx", inputs)
    assert parity["max_abs_diff"] <= ONNX_TOLERANCE, parity
    if text:  # one unpadded sequence of another length
        parity = encoder_onnx_parity(model, tmp_path / "model.onnx", sample_encoder_inputs(model, batch=1, seq=5))
        assert parity["max_abs_diff"] <= ONNX_TOLERANCE, parity


# ----------------------------------------------------------------------------- misc, inputs
def test_task_head_models_are_refused(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config("bert")).eval()
    with pytest.raises(CompressError, match="export its base model instead"):
        export_encoder_safetensors(model, None, tmp_path)
    with pytest.raises(CompressError, match="export its base model instead"):
        export_encoder_onnx(model, tmp_path)


def test_preprocessors_are_saved_beside_the_weights(exports, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, ViTImageProcessor

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)} | {"[UNK]": 99}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    text = export_encoder_safetensors(exports.model("bert"), tokenizer, tmp_path / "text")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(text["files"])

    image = export_encoder_safetensors(exports.model("vit"), ViTImageProcessor(size={"height": 32, "width": 32}),
                                       tmp_path / "image")
    assert "preprocessor_config.json" in image["files"]
    for folder, result in ((tmp_path / "text", text), (tmp_path / "image", image)):
        assert all((folder / name).is_file() for name in result["files"])


def test_sample_inputs_are_seeded_and_padded():
    bert, clip = tiny_encoder("bert"), tiny_encoder("clip_text_model")
    inputs = sample_encoder_inputs(bert, batch=2, seq=16, seed=0)
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert inputs["attention_mask"].tolist() == [[1] * 16, [1] * 8 + [0] * 8]
    assert all(torch.equal(inputs[name], sample_encoder_inputs(bert, seed=0)[name]) for name in inputs)
    assert not torch.equal(inputs["input_ids"], sample_encoder_inputs(bert, seed=1)["input_ids"])
    assert set(sample_encoder_inputs(clip)) == {"input_ids", "attention_mask"}
    assert (sample_encoder_inputs(clip)["input_ids"][1, 8:] == 1).all()  # the pad id where padded
    pixels = sample_encoder_inputs(tiny_encoder("dinov2"), batch=3)["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32


def test_vision_export_at_another_image_size(tmp_path):
    """DINOv2 is trained at 518² and fed 224²: the graph is traced at the size asked for."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2,
                                     patch_size=14, image_size=56)).eval()
    export_encoder_onnx(model, tmp_path, image_size=28)
    inputs = sample_encoder_inputs(model, batch=3, image_size=28)
    assert inputs["pixel_values"].shape == (3, 3, 28, 28)
    assert encoder_onnx_parity(model, tmp_path / "model.onnx", inputs)["max_abs_diff"] < 1e-4
