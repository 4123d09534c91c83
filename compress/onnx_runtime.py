"""Running an exported decoder in ONNX Runtime: sessions, the KV cache, greedy generation.

``OrtDecoder`` reads ``export.json`` (written by :mod:`exporters.onnx`) to size each layer's cache,
so it never needs the torch config. ``greedy_generate`` is the decoding loop that
``compress generate`` and the validator use: one prefill over the prompt, then one token per step
with the cache fed back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import CompressError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def import_onnxruntime():
    """The ``onnxruntime`` module, or a clear error saying which extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise CompressError(
            "ONNX Runtime is not installed: pip install 'compress[cpu]' (or 'compress[gpu]' for onnxruntime-gpu)"
        ) from None
    return onnxruntime


def select_providers(device: str, require: bool = False) -> list:
    """ORT providers for ``device`` (cpu, cuda, cuda:N): CUDA with TF32 off when the GPU build of ONNX
    Runtime is installed, else the CPU. With ``require``, asking for CUDA without it is an error
    instead of a fallback."""
    ort = import_onnxruntime()
    if not device.startswith("cuda"):
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in ort.get_available_providers():
        if require:
            raise CompressError(
                f"{device} asked for, but this ONNX Runtime has no {CUDA_PROVIDER}; install compress[gpu] "
                "(onnxruntime-gpu instead of onnxruntime) or use --device cpu"
            )
        return [CPU_PROVIDER]
    device_id = int(device.split(":", 1)[1]) if ":" in device else 0
    return [(CUDA_PROVIDER, {"device_id": device_id, "use_tf32": 0}), CPU_PROVIDER]


class OrtDecoder:
    """An exported decoder folder opened in ONNX Runtime.

    ``optimization``: ``basic`` (constant folding and redundancy removal only; what parity checks use)
    or ``all`` (every ORT fusion; what deployment and the speed benchmark use). ``require_device``:
    fail instead of falling back to the CPU when CUDA is asked for but unavailable.
    ``session_config``: extra ORT session config entries, e.g.
    ``{"session.intra_op.allow_spinning": "0"}``. ``logits``: ``all`` gives logits at every position
    even from a fused graph that writes the last one only (it runs that graph without its final
    slice, from the same weights); ``graph`` runs the graph as written (a generation loop reads only
    the last position).
    """

    def __init__(
        self,
        folder: Path,
        device: str = "cpu",
        optimization: str = "basic",
        threads: int | None = None,
        require_device: bool = False,
        session_config: dict[str, str] | None = None,
        logits: str = "all",
    ):
        from exporters.onnx import ONNX_FILE, SPEC_FILE, DecoderIOSpec

        ort = import_onnxruntime()
        self.folder = Path(folder)
        for name in (ONNX_FILE, SPEC_FILE):
            if not (self.folder / name).is_file():
                raise CompressError(f"{self.folder} is not an exported ONNX decoder: {name} is missing")
        self.spec = DecoderIOSpec.load(self.folder)
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        providers = select_providers(device, require=require_device)
        model = str(self.folder / ONNX_FILE)
        if logits == "all" and self.spec.logits == "last":  # the same weights, logits at every position
            model = self._full_logits_graph(options)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as error:  # InvalidProtobuf, Fail, NoSuchFile: a damaged or incomplete export
            raise CompressError(f"{self.folder / ONNX_FILE}: ONNX Runtime cannot load it "
                                f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})"
                                "; export the model again") from None
        self.dtype = _NUMPY_DTYPES[self.spec.dtype]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _full_logits_graph(self, options) -> bytes:
        """The folder's last-position graph with logits at every position (exporters.onnx_fused), as
        bytes whose external weights ONNX Runtime reads from the folder."""
        import onnx

        from exporters.onnx import ONNX_FILE
        from exporters.onnx_fused import full_logits_twin

        try:
            proto = onnx.load(str(self.folder / ONNX_FILE), load_external_data=False)
        except Exception as error:  # noqa: BLE001 - a damaged graph file
            raise CompressError(f"{self.folder / ONNX_FILE}: not a readable ONNX graph ({error}); export the model again") from None
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        return full_logits_twin(proto).SerializeToString()

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (the first one ORT accepted)."""
        return self.session.get_providers()[0]

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A cache with no positions: per layer, key and value [batch, kv_heads_i, 0, head_dim]."""
        return [
            tuple(np.zeros((batch, heads, 0, self.spec.head_dim), dtype=self.dtype) for _ in range(2))
            for heads in self.spec.kv_heads
        ]

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past=None):
        """One step. input_ids [b, s] int; attention_mask [b, p + s] (all ones when None); position_ids
        [b, s] (from the mask when None); past from ``empty_past`` or a previous step.

        Returns (logits [b, s, vocab] ([b, 1, vocab] from a last-position graph opened with
        ``logits="graph"``), present: list of (key, value) [b, kv_heads_i, p + s, head_dim]).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -seq:]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self.input_names:  # a fused graph takes its positions from the mask
            feeds["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        for layer, (key, value) in enumerate(past):
            key_name, value_name = self.spec.past_names(layer)
            feeds[key_name], feeds[value_name] = key, value
        outputs = self.session.run(None, feeds)
        present = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.spec.num_layers)]
        return outputs[0], present


def load_tokenizer(folder: Path):
    """The tokenizer saved beside an exported graph."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # a missing or damaged tokenizer file
        raise CompressError(f"{folder}: no tokenizer files beside the graph ({error})") from None


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position of each token counted over real tokens only (left padding gets position 0)."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)


@dataclass
class Generation:
    """Greedy continuation of one prompt: ``tokens`` are the new ids only."""

    prompt: list[int]
    tokens: list[int]


def greedy_generate(decoder: OrtDecoder, prompt: list[int], max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
    """Greedy decoding with the KV cache: prefill the prompt, then feed one token per step."""
    if not prompt:
        raise CompressError("the prompt is empty after tokenisation")
    eos = set(decoder.spec.eos_token_id) if stop_at_eos else set()
    ids = np.asarray([prompt], dtype=np.int64)
    logits, past = decoder(ids)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0, -1]))
        tokens.append(token)
        if token in eos or len(tokens) == max_new_tokens:
            break
        logits, past = decoder(np.asarray([[token]], dtype=np.int64), past=past)
    return Generation(prompt=list(prompt), tokens=tokens)


def torch_greedy_generate(model, prompt: list[int], max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
    """The same greedy continuation from the PyTorch model, through transformers' ``generate``."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    from exporters.onnx import eos_token_ids

    eos = eos_token_ids(model) if stop_at_eos else None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=(eos[0] if eos else 0),
        )
    return Generation(prompt=list(prompt), tokens=[int(t) for t in out[0, len(prompt):]])

