"""Random numbers addressed by position: the draw for element i of a tensor depends only on
(seed, stream, i), so a tensor merged in row chunks, in another order or on another device
gets the same draws as when merged whole."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 16  # elements drawn per generator seeding
MAX_THREADS = 4


def _block_seed(seed: int, stream: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{stream}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def uniform(numel: int, seed: int, stream: int, offset: int) -> torch.Tensor:
    """U[0, 1) float32 draws for flat elements [offset, offset + numel) of ``stream``.

    The blocks are independent, so runs of them are drawn on up to ``MAX_THREADS`` threads
    at once (torch releases the GIL while drawing): the draws dominate DARE's time."""
    import torch

    out = torch.empty(numel, dtype=torch.float32)
    if numel == 0:
        return out
    blocks = range(offset // BLOCK, (offset + numel - 1) // BLOCK + 1)
    step = -(-len(blocks) // min(len(blocks), MAX_THREADS, os.cpu_count() or 1))
    runs = [blocks[i:i + step] for i in range(0, len(blocks), step)]

    def fill(run: range) -> None:
        gen = torch.Generator(device="cpu")
        for block in run:
            start, end = max(offset, block * BLOCK), min(offset + numel, (block + 1) * BLOCK)
            gen.manual_seed(_block_seed(seed, stream, block))
            dest = out[start - offset:end - offset]
            if end - start == BLOCK:  # a whole block: draw it in place
                torch.rand(BLOCK, generator=gen, dtype=torch.float32, out=dest)
            else:
                first = start - block * BLOCK
                draws = torch.rand(BLOCK, generator=gen, dtype=torch.float32)
                dest.copy_(draws[first:first + end - start])

    with ThreadPoolExecutor(len(runs) - 1) if len(runs) > 1 else nullcontext() as pool:
        helpers = [pool.submit(fill, run) for run in runs[1:]] if pool else []
        fill(runs[0])
        for helper in helpers:
            helper.result()  # re-raises a helper's error
    return out
