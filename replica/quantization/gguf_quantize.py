"""Float weights → GGML blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), in torch so it runs on the GPU.

For benchmarks and tests, which need GGUF-encoded weights without a GGUF file (the GPU machine has
no `gguf` package and no downloads). The encodings are GGML's; tests decode them with gguf's own
`dequantize`. Q4_0, Q5_0 and Q8_0 follow gguf-py's reference quantisers (same rounding); Q4_K and Q5_K use a
plain min/max fit per 32-element sub-block, not llama.cpp's iterative search, so its error is a
little larger than a real Q4_K_M file's (a benchmark's speed does not depend on it); Q6_K
likewise uses a plain signed max fit per 16-element sub-block (llama.cpp's, without its search).
`llama_cpp_mix` names the types llama.cpp's Q4_K_M and Q4_0 give each tensor of a Llama model.

Every function takes w: float [rows, cols] with cols a multiple of the block size and returns
uint8 [rows, cols / block_size * block_bytes] (a `GGUFTensor`'s data).
"""
import torch

from replica.quantization.gguf_packed import BLOCK_BYTES, GGUFTensor


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    # float [...] → uint8 [..., 2]
    return values.half().contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _pair_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: uint8 [..., 32] codes 0..15 → [..., 16]: byte i = q[i] | q[i + 16] << 4 (GGML's order)
    return q[..., :16] | (q[..., 16:] << 4)


def _symmetric_fit(w: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's and Q5_0's fit (gguf-py's rounding): per 32-element block, the signed value of
    largest magnitude maps to code 0 (−half); codes 0..2·half − 1. → (d [rows, nb], codes uint8)."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    index = blocks.abs().argmax(-1, keepdim=True)
    d = (blocks.gather(-1, index) / -half)[..., 0]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)[..., None]
    q = torch.trunc(blocks * inv + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.uint8)
    return d, q


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric_fit(w, 8)
    return torch.cat([_fp16_bytes(d), _pair_nibbles(q)], dim=-1).reshape(w.shape[0], -1)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)[..., None]
    scaled = blocks * inv
    q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)   # roundf: half away
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=-1).reshape(rows, -1)


def _k_quant_fit(w: torch.Tensor, levels: int):
    """Q4_K's and Q5_K's fit: 256-superblocks of 8 sub-blocks of 32, each with a 6-bit scale and
    min (× the superblock's fp16 d and dmin), codes 0..levels − 1. Returns (codes uint8
    [rows, nsb, 8, 32], d and dmin as fp16 bytes [rows, nsb, 2] each, the 12 packed scale bytes)."""
    rows, cols = w.shape
    sub = w.float().reshape(rows, cols // 256, 8, 32)                 # superblocks of 8 sub-blocks
    low = sub.amin(-1).clamp(max=0)                                    # offsets are ≤ 0 in K-quants
    sub_scale = (sub.amax(-1) - low) / (levels - 1)
    sub_min = -low
    d = (sub_scale.amax(-1) / 63).half().float()                       # [rows, nsb]
    dmin = (sub_min.amax(-1) / 63).half().float()
    safe_d = torch.where(d == 0, torch.ones_like(d), d)[..., None]
    safe_dmin = torch.where(dmin == 0, torch.ones_like(dmin), dmin)[..., None]
    sc = torch.round(sub_scale / safe_d).clamp(0, 63)
    mn = torch.round(sub_min / safe_dmin).clamp(0, 63)
    step = (d[..., None] * sc)[..., None]
    offset = (dmin[..., None] * mn)[..., None]
    step_safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round((sub + offset) / step_safe).clamp(0, levels - 1).to(torch.uint8)   # [rows, nsb, 8, 32]
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    packed_scales = torch.cat([
        (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6),
        (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4),
    ], dim=-1)                                                         # [rows, nsb, 12]
    return q, _fp16_bytes(d), _fp16_bytes(dmin), packed_scales


def _sub_block_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: [rows, nsb, 8, 32] → [rows, nsb, 128]: byte 32c + l = sub-block 2c low, 2c + 1 high nibble
    chunks = (q & 0x0F).reshape(q.shape[0], -1, 4, 2, 32)
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(q.shape[0], -1, 128)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    q, d, dmin, scales = _k_quant_fit(w, 16)
    return torch.cat([d, dmin, scales, _sub_block_nibbles(q)], dim=-1).reshape(w.shape[0], -1)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    sub = w.float().reshape(rows, cols // 256, 16, 16)
    # each sub-block's signed largest value maps to code -32; the sub-scales likewise to -128
    sub_scale = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))[..., 0] / -32    # [rows, nsb, 16]
    d = (sub_scale.gather(-1, sub_scale.abs().argmax(-1, keepdim=True)) / -128).half().float()
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    sc = torch.round(sub_scale / safe_d).clamp(-128, 127)
    step = (d * sc)[..., None]
    step_safe = torch.where(step == 0, torch.ones_like(step), step)
    q = (torch.round(sub / step_safe).clamp(-32, 31) + 32).to(torch.uint8).reshape(rows, -1, 2, 128)
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)                 # [rows, nsb, 2, 64]
    top = (q >> 4).reshape(rows, -1, 2, 4, 32)
    qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc_bytes,
                     _fp16_bytes(d[..., 0])], dim=-1)
    return out.reshape(rows, -1)


def quantize_q5_0(w: torch.Tensor) -> torch.Tensor:
    rows = w.shape[0]
    d, q = _symmetric_fit(w, 16)
    bits = ((q >> 4).to(torch.int64) << torch.arange(32, device=w.device)).sum(-1).to(torch.int32)
    qh = bits.contiguous().view(torch.uint8).reshape(rows, -1, 4)     # little-endian uint32
    return torch.cat([_fp16_bytes(d), qh, _pair_nibbles(q & 0x0F)], dim=-1).reshape(rows, -1)


def quantize_q5_k(w: torch.Tensor) -> torch.Tensor:
    """Q4_K's fit with 32 levels; the codes' 5th bits in 32 bytes (bit j of byte l: element l of
    sub-block j) before the nibbles."""
    q, d, dmin, scales = _k_quant_fit(w, 32)
    qh = ((q >> 4) << torch.arange(8, dtype=torch.uint8, device=w.device)[:, None]).sum(-2).to(torch.uint8)
    return torch.cat([d, dmin, scales, qh, _sub_block_nibbles(q)], dim=-1).reshape(w.shape[0], -1)


QUANTIZERS = {"Q4_0": quantize_q4_0, "Q8_0": quantize_q8_0, "Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k,
              "Q5_0": quantize_q5_0, "Q5_K": quantize_q5_k}


def _more_bits(layer: int, num_layers: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between
    return (layer < num_layers // 8 or layer >= 7 * num_layers // 8
            or (layer - num_layers // 8) % 3 == 2)


def llama_cpp_mix(ftype: str, name: str, num_layers: int) -> str:
    """The GGML type llama.cpp's `llama-quantize` gives a Llama tensor (HF name) for the file type
    `ftype` ("Q4_K_M", "Q5_K_M", or a single type such as "Q4_0"): the output head is Q6_K; the
    _K_M types also keep attn_v and ffn_down in Q6_K in the layers `_more_bits` picks."""
    if name == "lm_head.weight":
        return "Q6_K" if ftype != "Q8_0" else "Q8_0"
    if ftype not in ("Q4_K_M", "Q5_K_M"):
        return ftype
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    if name.endswith(("v_proj.weight", "down_proj.weight")) and _more_bits(layer, num_layers):
        return "Q6_K"
    return ftype.removesuffix("_M")


def quantize(w: torch.Tensor, qtype: str) -> GGUFTensor:
    """float [rows, cols] → a GGUFTensor of `qtype` on w's device."""
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantiser for {qtype} (have {sorted(QUANTIZERS)})")
    block_size = BLOCK_BYTES[qtype][1]
    if w.dim() != 2 or w.shape[1] % block_size:
        raise ValueError(f"{qtype}: expected [rows, cols] with cols a multiple of {block_size}, "
                         f"got {list(w.shape)}")
    return GGUFTensor(qtype, QUANTIZERS[qtype](w), tuple(w.shape))
