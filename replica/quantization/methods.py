"""Which quantisation serves a checkpoint: the operator's `--quantization`, or what an FP8
checkpoint's config.json declares, checked against the checkpoint's format and the device.

    None   weights in the model dtype (GGUF dequantised on load, as without quantisation)
    fp8    W8A8 FP8: bf16/fp16 weights quantised on load per output channel, or an FP8 checkpoint
           (compressed-tensors from llm-compressor, per-tensor "fp8", "fbgemm_fp8") loaded as is;
           activations quantised per token at run time. NVIDIA Ada (sm89) or Hopper (sm90+) only.
    gguf   a GGUF file's Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 projections and output head stay
           packed on the device.
"""
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("fp8", "gguf")
_FP8_CHECKPOINT_METHODS = ("compressed-tensors", "fp8", "fbgemm_fp8")


def checkpoint_quantization(folder: Path | None) -> str | None:
    """'fp8' when a Hugging Face folder's config.json declares FP8 weights, None when it declares
    nothing; ValueError for a quantisation this engine cannot load (naming it)."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not qcfg:
        return None
    method = qcfg.get("quant_method")
    if method not in _FP8_CHECKPOINT_METHODS:
        raise ValueError(f"{folder.name}: quantization_config.quant_method {method!r} is not "
                         f"supported (FP8 checkpoints only: {', '.join(_FP8_CHECKPOINT_METHODS)})")
    if method == "compressed-tensors":
        for name, group in (qcfg.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            if (weights.get("num_bits"), weights.get("type")) != (8, "float") or \
                    weights.get("strategy") not in ("channel", "tensor"):
                raise ValueError(
                    f"{folder.name}: compressed-tensors group {name!r} has weights {weights}; only "
                    "8-bit float weights with a per-channel or per-tensor scale are supported")
    return "fp8"


def fp8_device_error(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return (f"--quantization fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada or Hopper); "
                f"the device is {device.type}. Serve the unquantised weights, or a GGUF file with "
                "--quantization gguf")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"--quantization fp8 needs compute capability 8.9 (Ada) or 9.0+ (Hopper); {name} "
                f"has {capability[0]}.{capability[1]}. Serve the unquantised weights instead")
    return None


def resolve_quantization(requested: str | None, checkpoint, device: torch.device) -> str | None:
    """requested: EngineConfig.quantization. checkpoint: an opened checkpoint (`format` is
    "hf", "gguf", "dummy" or "memory"; `path` its folder or file). Raises ValueError with the fix."""
    declared = checkpoint_quantization(checkpoint.path) if checkpoint.format in ("hf", "dummy") else None
    if declared == "fp8" and requested not in (None, "fp8"):
        raise ValueError(f"the checkpoint holds FP8 weights; --quantization {requested} cannot "
                         "serve it (leave the flag out, or give --quantization fp8)")
    method = requested or declared
    if method == "gguf" and checkpoint.format not in ("gguf", "memory"):
        raise ValueError("--quantization gguf keeps a GGUF file's weights quantised: give a .gguf "
                         "model, or use --quantization fp8 for a safetensors checkpoint")
    if method == "fp8":
        error = fp8_device_error(device)
        if error:
            if declared == "fp8" and requested is None:
                error = "the checkpoint holds FP8 weights: " + error
            raise ValueError(error)
    if declared == "fp8" and requested is None:
        log.info("checkpoint declares FP8 weights: serving with quantization fp8")
    return method
