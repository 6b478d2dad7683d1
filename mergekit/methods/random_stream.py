"""Random numbers addressed by position: the draw for element i of a tensor depends only on
(seed, stream, i), so a tensor merged in row chunks, in another order or on another device
gets the same draws as when merged whole."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 16  # elements drawn per generator seeding


def _block_seed(seed: int, stream: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{stream}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def uniform(numel: int, seed: int, stream: int, offset: int) -> torch.Tensor:
    """U[0, 1) float32 draws for flat elements [offset, offset + numel) of ``stream``."""
    import torch

    out = torch.empty(numel, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    pos = offset
    while pos < offset + numel:
        block, start = divmod(pos, BLOCK)
        take = min(BLOCK - start, offset + numel - pos)
        gen.manual_seed(_block_seed(seed, stream, block))
        if take == BLOCK:  # a whole block: draw it in place
            torch.rand(BLOCK, generator=gen, dtype=torch.float32,
                       out=out[pos - offset:pos - offset + take])
        else:
            draws = torch.rand(BLOCK, generator=gen, dtype=torch.float32)
            out[pos - offset:pos - offset + take] = draws[start:start + take]
        pos += take
    return out
