"""How a packed decode GEMV (`gguf_gemv_triton`) cuts its work: the tile a program takes
(`GemvConfig`, chosen by `choose_gemv_config` from sweeps inside the model on an H200, or a
measured entry of TUNED), and the launch's shape-derived plan (`plan_gemv`: lanes along K, split-K,
whether the tiles of a split can be unrolled). No kernels here: the plan depends only on shapes,
so a launch is valid inside a CUDA graph."""
import functools
from dataclasses import dataclass

import torch
import triton

from replica.kernels import gguf_gemv8_triton
from replica.quantization.gguf_packed import GROUP_SIZE, PackedGGUF

# The int8-x 6-bit GEMV's (rows, groups, warps) a program (`choose_gemv_config`)
X_INT8_TILE = (2, 32, 1)
X_INT8_WIDE_TILE = (2, 128, 4)
# A config with unroll runs a split of at most MAX_UNROLLED_TILES tiles unrolled (`_q4_gemv_kernel`'s
# TILES): a lane issues every tile's loads before its first product.
MAX_UNROLLED_TILES = 16


@dataclass(frozen=True)
class GemvConfig:
    block_n: int          # rows of W a program owns
    groups: int           # lanes along K a tile (a power of two): 32-column groups (4-bit),
                          # 16-column chunks (8-bit)
    split_k: int = 1
    num_warps: int = 4
    unroll: bool = False  # int8 x: a split's tiles unrolled (when its splits have equal tile counts)


# (GGML type, rows of x, N, K) → config, filled by a measured sweep (bench/quant.py).
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {}


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_gemv_config(num_rows: int, n: int, k: int, bits: int, device: torch.device,
                       qtype: str = "", x_int8: bool = False) -> GemvConfig:
    """A measured entry of TUNED, else the winners of sweeps inside the model on an H200 (8B
    shapes; a lane: a 32-element group, or a 16-byte chunk of 8-bit codes; bench/NOTES.md, "Where a
    4-bit W2 step goes" and "The 4-bit GEMV's tiles unrolled").
    4-bit, int8 x: one-warp programs; a row of up to 4,096 columns (128 groups) is taken whole,
    its tiles unrolled, 4 rows x 32 groups where that gives >= 32 programs an SM (gate_up), else
    2 x 64 (qkv, o); longer rows (down) loop over 2 x 32 tiles in two halves of K.
    6-bit, int8 x: 2 rows x 32 groups a warp where that gives >= 32 programs an SM (the head),
    else 4 warps over 2 rows x 128 groups. 8-bit: 2 x 64 chunks, in one warp where rows give
    >= 32 programs an SM, else in 4. bf16 x: 4 x 64 in 4 warps. Then split-K while the grid has
    fewer than ~8 programs an SM (none at the 8B shapes)."""
    tuned = TUNED.get((qtype, num_rows, n, k))
    if tuned is not None:
        return tuned
    unroll = False
    num_groups = k // (GROUP_SIZE if bits in (4, 6) else gguf_gemv8_triton.CHUNK)
    split_k = 1
    if bits == 4 and x_int8:
        num_warps, unroll = 1, num_groups <= 128
        if not unroll:
            block_n, groups, split_k = 2, 32, 2
        elif triton.cdiv(n, 4) >= 32 * num_sms(device):
            block_n, groups = 4, 32
        else:
            block_n, groups = 2, 64
    elif bits == 6 and x_int8:
        block_n, groups, num_warps = X_INT8_TILE
        if triton.cdiv(n, block_n) < 32 * num_sms(device):
            block_n, groups, num_warps = X_INT8_WIDE_TILE
    elif bits == 4:
        block_n, groups, num_warps = 4, 64, 4
    elif triton.cdiv(n, 2) >= 32 * num_sms(device):
        block_n, groups, num_warps = 2, 64, 1
    else:
        block_n, groups, num_warps = 2, 64, 4
    while (triton.cdiv(n, block_n) * split_k < 8 * num_sms(device)
           and num_groups >= 2 * split_k * groups and split_k < 16):
        split_k *= 2
    return GemvConfig(block_n, groups, split_k, num_warps=num_warps, unroll=unroll)


@dataclass(frozen=True)
class GemvPlan:
    """A GEMV launch's shape-derived parameters."""
    config: GemvConfig
    num_groups: int          # lanes' units along K: 32-element groups (4-bit), 16-code chunks (8-bit)
    groups: int
    groups_per_split: int
    split_k: int
    even_k: bool
    x_int8: bool             # 4-bit: x rounded to int8 (`gguf_gemv_x8_triton`)

    def unrolled_tiles(self, max_tiles: int) -> int:
        """Tiles a split, when every split has that many and it is at most max_tiles; else 0."""
        num_tiles = triton.cdiv(self.num_groups, self.groups)
        tiles = self.groups_per_split // self.groups
        return tiles if tiles <= max_tiles and num_tiles == tiles * self.split_k else 0


def plan_gemv(num_rows: int, packed: PackedGGUF, device: torch.device, config: GemvConfig | None,
              x_int8: bool) -> GemvPlan:
    """The launch's plan for `packed` at num_rows rows of x: config (else `choose_gemv_config`'s),
    K cut into whole tiles, split-K without an empty split."""
    n, k = packed.shape
    config = config or choose_gemv_config(num_rows, n, k, packed.bits, device, packed.qtype, x_int8)
    # lanes along K: 4-bit, one 32-element group each; 8-bit, one 16-code chunk each
    lane_cols = GROUP_SIZE if packed.bits in (4, 6) else gguf_gemv8_triton.CHUNK
    num_groups = k // lane_cols
    groups = min(config.groups, triton.next_power_of_2(num_groups))
    num_tiles = triton.cdiv(num_groups, groups)
    split_k = max(1, min(config.split_k, num_tiles))
    groups_per_split = triton.cdiv(num_tiles, split_k) * groups
    split_k = triton.cdiv(num_groups, groups_per_split)                 # no empty split
    return GemvPlan(config, num_groups, groups, groups_per_split, split_k, num_groups % groups == 0, x_int8)
