"""Compare two merged model folders tensor by tensor, in units of the stored dtype's
rounding: for a GPU merge against the same merge on the CPU, which must agree within
rounding. Prints one line per tensor that differs and a summary; exits 1 when a tensor is
missing, has another shape or dtype, or differs by more than ``--ulps`` units in the last
place anywhere (by more than rounding).

    python benchmarks/compare_outputs.py ./merged-cpu ./merged-cuda [--ulps 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def ulp_distance(a, b):
    """Per element, how many representable values of the dtype lie between a and b (0 for
    equal values, 1 for neighbours); the tensors share a floating dtype of 16 or 32 bits."""
    import torch

    ints = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}
    int_dtype, magnitude = ints[a.element_size()]

    def ordered(x):  # bit patterns mapped to integers in the order of the values
        bits = x.contiguous().view(int_dtype).to(torch.int64)
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (ordered(a) - ordered(b)).abs()


def compare(a_folder: Path, b_folder: Path, ulps: int) -> tuple[list[str], bool]:
    a, b = load(a_folder), load(b_folder)
    lines, ok = [], True
    if a.keys() != b.keys():
        ok = False
        lines.append(f"tensors only in {a_folder}: {sorted(a.keys() - b.keys())[:5]}; only in "
                     f"{b_folder}: {sorted(b.keys() - a.keys())[:5]}")
    worst, elements, differing = 0, 0, 0
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            ok = False
            lines.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            continue
        distance = ulp_distance(x, y)
        far = int(distance.max()) if distance.numel() else 0
        elements += distance.numel()
        differing += int((distance > 0).sum())
        worst = max(worst, far)
        if far > ulps:
            ok = False
        if far > 0:
            lines.append(f"{name}: {int((distance > 0).sum())} of {distance.numel()} elements "
                         f"differ, by at most {far} ulp")
    share = differing / elements if elements else 0.0
    lines.append(f"{len(a.keys() & b.keys())} tensors, {elements} elements: {differing} "
                 f"({share:.4%}) differ, by at most {worst} ulp (allowed {ulps})")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ulps", type=int, default=1, help="largest difference allowed")
    args = ap.parse_args()
    lines, ok = compare(args.a, args.b, args.ulps)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
