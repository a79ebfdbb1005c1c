"""The prompt encoder's transformer on ONNX Runtime: float32 (`onnx`) or with int8 weights (`onnx-int8`).

Only the transformer's forward pass moves: tokenizing, mean pooling and normalising stay sentence-transformers'
own, so an `<encoder>@onnx-int8` embedder goes through the same `load_encoder` / `encode` path as the PyTorch one.
sentence-transformers' `backend="onnx"` would do this through optimum-onnx, whose only release pins
transformers < 4.58 (this project runs transformers 5); so the export is made here, with torch's exporter and
ONNX Runtime's dynamic quantiser (int8 weights per output channel, uint8 activations: the settings of
sentence-transformers' "avx512_vnni" and "arm64" configs), once, offline, from the local model files, into
`<cache root>/models/<encoder>-onnx`:

    python -m serve.core.onnx_encoder                     # the default encoder; scripts/setup_onnx.sh runs it
    python -m serve.core.onnx_encoder all-mpnet-base-v2
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from serve.core import paths

# The encoder backends an embedder name may end in (`all-MiniLM-L6-v2@onnx-int8`); no suffix means PyTorch.
TORCH_BACKEND = "torch"
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
ENCODER_BACKENDS = (TORCH_BACKEND, *ONNX_FILES)
EXTRA = "onnx"
# Padded on purpose, so that the traced graph takes the attention mask's padding path.
_SAMPLE_PROMPTS = ["a short prompt", "a longer prompt, so that the first one of this sample batch is padded"]


class MissingExportError(OSError):
    """An ONNX backend was asked for, but its export (or ONNX Runtime itself) is not installed."""


def export_folder(encoder_name: str) -> Path:
    return paths.cache_dir() / "models" / f"{encoder_name}-onnx"


def _command(encoder_name: str) -> str:
    return f"python -m serve.core.onnx_encoder {encoder_name}"


def _require_onnxruntime(embedder: str, then: str) -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingExportError(f"embedder {embedder!r} needs the optional extra `{EXTRA}` (onnxruntime is not "
                                 f"installed): pip install -e '.[{EXTRA}]'{then}")


def export_file(encoder_name: str, backend: str) -> Path:
    """The ONNX file of `encoder_name` for `backend`; names what to install or run if it is not there."""
    _require_onnxruntime(f"{encoder_name}@{backend}", f", then run {_command(encoder_name)}")
    file = export_folder(encoder_name) / ONNX_FILES[backend]
    if not file.is_file():
        raise MissingExportError(f"embedder '{encoder_name}@{backend}' needs its ONNX export {file}, which is not made: "
                                 f"run {_command(encoder_name)} (scripts/setup_onnx.sh does it for the default encoder)")
    return file


class OnnxTransformerModel(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' Transformer module: the tokenizer's
    tensors in, `last_hidden_state` out, computed by an ONNX Runtime session on as many threads as torch uses."""

    def __init__(self, file: Path, config):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.config = config

    def forward(self, **features) -> dict[str, torch.Tensor]:
        (hidden,) = self.session.run(None, {name: features[name].numpy() for name in self.input_names})
        return {"last_hidden_state": torch.from_numpy(hidden)}


def run_transformer_on_onnx(encoder, file: Path):
    """Swap `encoder`'s transformer (its first module's model) for `file` on ONNX Runtime; returns `encoder`."""
    transformer = encoder[0]
    transformer.model = OnnxTransformerModel(file, transformer.model.config)
    return encoder


class _LastHiddenState(torch.nn.Module):
    """The Hugging Face model as a function of positional tensors, as torch's exporter traces it."""

    def __init__(self, model, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).last_hidden_state


def _export(encoder, folder: Path) -> None:
    """Write the float32 export of `encoder`'s transformer and its dynamically int8-quantised copy into `folder`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sample = encoder.tokenizer(_SAMPLE_PROMPTS, padding=True, return_tensors="pt")
    input_names = list(sample.keys())
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in (*input_names, "last_hidden_state")}
    float_file = folder / ONNX_FILES["onnx"]
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHiddenState(encoder[0].model, input_names).eval(), tuple(sample.values()), str(float_file),
                          input_names=input_names, output_names=["last_hidden_state"], dynamic_axes=dynamic_axes,
                          opset_version=17, dynamo=False)
    quantize_dynamic(str(float_file), str(folder / ONNX_FILES["onnx-int8"]), weight_type=QuantType.QInt8, per_channel=True)


def is_exported(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ONNX_FILES.values())


def prepare_onnx(encoder_name: str) -> Path:
    """The folder of `encoder_name`'s ONNX exports (an offline encoder's short name), made on first call from
    its PyTorch weights on the CPU."""
    # Imported here, not at the top: that module imports this one.
    from serve.core.encoder import load_encoder

    _require_onnxruntime(encoder_name, "")
    encoder = load_encoder(encoder_name, device="cpu")
    return paths.build_folder_once(export_folder(encoder_name), lambda folder: _export(encoder, folder), is_exported)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", nargs="?", default="all-MiniLM-L6-v2", help="an offline encoder's short name")
    print(prepare_onnx(parser.parse_args().encoder))
