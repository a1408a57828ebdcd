"""ONNX export of a (pruned) model, checked once in onnxruntime.

The exported graph takes ``pixel_values`` (images) or ``input_ids`` + ``attention_mask``
(text encoders) with a dynamic batch axis (and a dynamic sequence axis for text), and returns
what fidelity is measured on (:func:`vit_pruning.measure.forward_output`): logits for a
classifier, the image embedding for CLIP / SigLIP (a dual model exports its image path), the
last hidden state for other backbones; text encoders return their last hidden state. onnx,
onnxscript and onnxruntime are the optional extra ``vit-2ssp[export]``.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .measure import example_inputs, forward_output, output_tensor

CHECK_BATCH = 3  # onnxruntime is checked at another batch size than the export's


class OnnxUnavailable(ImportError):
    """onnx / onnxscript / onnxruntime are not installed."""


def require_onnx() -> None:
    """Raise OnnxUnavailable (one line, with the install command) if the export extra is missing."""
    import importlib.util
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxUnavailable(f"{', '.join(missing)} not installed: pip install 'vit-2ssp[export]'")


class _ImageOutput(nn.Module):
    """The model with named inputs and its output reduced to one tensor (see
    :func:`vit_pruning.measure.forward_output`), as torch.export wants them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return forward_output(self.model, pixel_values)


class _TextOutput(_ImageOutput):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return output_tensor(self.model(input_ids=input_ids, attention_mask=attention_mask))


def _inputs(model: nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    x = example_inputs(model, batch, seq_len=seq_len, seed=batch)
    if "input_ids" in x:
        x["attention_mask"] = torch.ones_like(x["input_ids"])
    return x


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, seq_len: int = 16) -> dict:
    """Write `path` (an ONNX graph with a dynamic batch axis), run it once in onnxruntime on a
    batch of another size, and return {"path", "max_abs_diff" (to the torch model on the same
    inputs), "check_batch", "opset", "onnxruntime"}. Never overwrites `path`."""
    require_onnx()
    import onnxruntime as ort

    path = Path(path)
    cpu = copy.deepcopy(model).float().cpu().eval()
    text = "input_ids" in example_inputs(cpu, 1, seq_len=2)
    wrapped = (_TextOutput if text else _ImageOutput)(cpu).eval()
    x = _inputs(cpu, 2, seq_len)
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch, 1: torch.export.Dim("sequence", min=2)} if text else {0: batch}
    dims = tuple(axes for _ in x)

    def write(tmp: Path) -> None:
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its notes on absent torchvision ops are noise here
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(wrapped, tuple(x.values()), dynamo=True,
                                            dynamic_shapes=dims, input_names=list(x),
                                            output_names=["output"], verbose=False)
        finally:
            quiet.setLevel(level)
        program.save(str(tmp))

    atomic_write(path, write)
    check = _inputs(cpu, CHECK_BATCH, seq_len + 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v.numpy() for k, v in check.items() if k in names})[0]
    want = wrapped(*check.values())
    diff = float((torch.from_numpy(got) - want).abs().max())
    import onnx
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    return {"path": str(path), "max_abs_diff": diff, "check_batch": CHECK_BATCH, "opset": opset,
            "onnxruntime": ort.__version__}
