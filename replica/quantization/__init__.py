"""Quantised weights: which method serves a checkpoint (`methods.py`), GGUF's packed layout
(`gguf_packed.py`) and a GGUF encoder for tests and benchmarks (`gguf_quantize.py`). The
kernels live in `replica/kernels/` (gguf_linear*, fp8_*), the layers that hold quantised
weights in `replica/layers/quantized_linear.py`."""
