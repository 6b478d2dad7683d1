"""Benchmark mergekit-yaml on Llama-shaped models: wall and CPU time, peak RSS, bytes
moved, and the I/O floor of the same data measured in the same run.

    python benchmarks/bench.py                      # three ~0.6 GB bf16 models
    python benchmarks/bench.py --size large         # ~2.2 GB each
    python benchmarks/bench.py --compare-with /path/to/other/bin/mergekit-yaml
    python benchmarks/bench.py --quick              # tiny models, one run (kept working by a test)

Models are generated once (deterministic) under benchmarks/.cache/. Figures are medians
of --runs runs; with --compare-with, the two tools alternate and ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

SIZES = {
    # name: (hidden, intermediate, layers, vocab, shard_bytes)
    "quick": (64, 128, 2, 512, 64_000),
    "small": (2048, 5632, 3, 32000, 250_000_000),
    "large": (2048, 5632, 22, 32000, 1_000_000_000),
}


def layer_shapes(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[str, tuple]]:
    kv = hidden // 4  # grouped-query attention, as Llama-style models use
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_shard(path: Path, tensors: list[tuple[str, object]]) -> None:
    header, offset = {}, 0
    for name, t in tensors:
        n = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(t.contiguous().view(__import__("torch").uint8).numpy().tobytes())


def write_tokenizer(folder: Path, vocab: int, added: list[str]) -> None:
    """A byte-level BPE ``tokenizer.json`` of ``vocab`` plain tokens (no merges: only the
    vocabulary matters to a merge) and ``added`` special tokens after them."""
    tokens = {f"t{i}": i for i in range(vocab)}
    data = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": vocab + k, "content": t, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True} for k, t in enumerate(added)],
        "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                              "trim_offsets": True, "use_regex": True},
        "post_processor": None, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": tokens, "merges": []},
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))


# added tokens of the vocabulary benchmark's models (32000, 32002 and 32005 rows)
VOCAB_ADDED = {"a": [], "b_vocab": ["<|im_start|>", "<|im_end|>"],
               "c_vocab": ["<tool_call>", "</tool_call>", "<|im_end|>", "<think>", "</think>"]}


def build_model(folder: Path, seed: int, size: str, added: list[str] | None = None) -> None:
    """A Llama-shaped bf16 model of random weights, sharded, with an index, and a
    tokenizer whose ``added`` tokens get rows of their own."""
    import torch

    hidden, inter, layers, vocab, shard_bytes = SIZES[size]
    added = added or []
    if (folder / "model.safetensors.index.json").is_file():
        if not (folder / "tokenizer.json").is_file():
            write_tokenizer(folder, vocab, added)
        return
    base_vocab, vocab = vocab, vocab + len(added)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list] = [[]]
    used = 0
    for name, shape in layer_shapes(hidden, inter, layers, vocab):
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if used and used + t.numel() * 2 > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, t))
        used += t.numel() * 2
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(tmp / fname, tensors)
        for name, t in tensors:
            weight_map[name] = fname
            total += t.numel() * 2
        shards[i] = []  # free memory as we go
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp, base_vocab, added)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def recipes(models: list[Path], layers: int) -> dict[str, dict]:
    a, b, c = (str(m) for m in models[:3])
    bv, cv = (str(m) for m in models[3:]) if len(models) > 3 else (b, c)
    half = max(1, layers // 2)
    return {
        # linear of a with b's changes as a rank-64 LoRA adapter of a (lora_input), and the
        # same merge of full models (lora_full)
        "lora_input": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": f"{a}+{Path(a).parent / 'b_lora64'}", "parameters": {"weight": 0.5}},
            {"model": c, "parameters": {"weight": 0.5}}]},
        "lora_full": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": b, "parameters": {"weight": 0.5}},
            {"model": c, "parameters": {"weight": 0.5}}]},
        # the same 3-model union merge, of one vocabulary and of three (32000/32002/32005)
        "vocab_same": {"merge_method": "linear", "dtype": "bfloat16",
                       "tokenizer_source": "union", "base_model": a, "models": [
                           {"model": a, "parameters": {"weight": 0.4}},
                           {"model": b, "parameters": {"weight": 0.3}},
                           {"model": c, "parameters": {"weight": 0.3}}]},
        "vocab_union": {"merge_method": "linear", "dtype": "bfloat16",
                        "tokenizer_source": "union", "base_model": a, "models": [
                            {"model": a, "parameters": {"weight": 0.4}},
                            {"model": bv, "parameters": {"weight": 0.3}},
                            {"model": cv, "parameters": {"weight": 0.3}}]},
        "linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": a, "parameters": {"weight": 0.4}},
            {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.3}}]},
        "linear_f16": {"merge_method": "linear", "dtype": "float16", "models": [
            {"model": a, "parameters": {"weight": 0.4}},
            {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.3}}]},
        "ties": {"merge_method": "ties", "base_model": a, "dtype": "bfloat16", "models": [
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": c, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": a, "dtype": "bfloat16",
                  "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.4}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": a, "dtype": "bfloat16",
                      "models": [
                          {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
                          {"model": c, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": a,
                             "dtype": "bfloat16", "models": [
            {"model": b, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.01}},
            {"model": c, "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.01}}]},
        "sce": {"merge_method": "sce", "base_model": a, "dtype": "bfloat16",
                "parameters": {"select_topk": 0.5}, "models": [{"model": b}, {"model": c}]},
        "model_stock": {"merge_method": "model_stock", "base_model": a, "dtype": "bfloat16",
                        "models": [{"model": b}, {"model": c}]},
        "multislerp": {"merge_method": "multislerp", "base_model": a, "dtype": "bfloat16",
                       "models": [{"model": b, "parameters": {"weight": 0.5}},
                                  {"model": c, "parameters": {"weight": 0.5}}]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": a, "dtype": "bfloat16", "models": [
            {"model": b, "parameters": {"weight": 0.5}},
            {"model": c, "parameters": {"weight": 0.5}}]},
        "karcher": {"merge_method": "karcher", "dtype": "bfloat16",
                    "models": [{"model": b}, {"model": c}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": a, "dtype": "bfloat16",
                         "models": [{"model": b}]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": a, "dtype": "bfloat16",
                       "models": [{"model": b}, {"model": c}]},
        "passthrough": {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": a, "layer_range": [0, layers]}]},
            {"sources": [{"model": b, "layer_range": [layers - half, layers]}]}]},
    }


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    read_mb: float
    written_mb: float
    ok: bool
    error: str = ""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def proc_io(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


# Runs the tool from a small process: on Linux a child's ru_maxrss starts at the RSS of the
# process it was forked from, so forking from this script (which may hold the models it just
# built) would inflate the figure. Prints the tool's pid, then its wall time and rusage.
LAUNCHER = """
import json, os, sys, time
devnull = os.open(os.devnull, os.O_WRONLY)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(devnull, 1)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "rc": os.waitstatus_to_exitcode(status),
                  "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}))
"""


def child_env() -> dict[str, str]:
    """The tools' environment: offline, and free to cache their Python bytecode as on a
    user's machine. PYTHONDONTWRITEBYTECODE (set in some sandboxes and CI images) would make
    a tool installed in editable mode, which pip does not precompile, compile its own
    modules from source on every run: measured here, 0.1-0.15 s of a 1.7 s merge, while
    a tool installed from a wheel is precompiled at install time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(tool: str, recipe: dict, workdir: Path, flags: tuple[str, ...] = ()) -> Sample:
    import yaml

    recipe_path = workdir / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    log = workdir / "stderr.log"  # a file, not a pipe: progress bars could fill a pipe
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, tool, str(recipe_path),
                                 str(out), *flags], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=child_env())
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    io_seen: dict[str, int] = {}
    while proc.poll() is None:  # sample the tool's /proc io counters while it lives
        io_seen = proc_io(child) or io_seen
        time.sleep(0.02)
    result = json.loads(proc.stdout.read())
    stderr = log.read_text(errors="replace")
    written = folder_bytes(out) if out.is_dir() else 0
    shutil.rmtree(out, ignore_errors=True)
    ok = result["rc"] == 0
    return Sample(result["wall_s"], result["cpu_s"], result["maxrss_kb"] / 1024,
                  io_seen.get("rchar", 0) / 1e6, written / 1e6, ok,
                  "" if ok else (stderr.strip().splitlines() or [f"exit {result['rc']}"])[-1])


def io_floor(models: list[Path], out_bytes: int, workdir: Path) -> float:
    """Seconds to read every input file and write out_bytes, with plain file calls."""
    start = time.perf_counter()
    buf = bytearray(16 << 20)
    for m in models:
        for f in sorted(m.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    target = workdir / "floor.bin"
    with open(target, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
    target.unlink()
    return time.perf_counter() - start


def paired_ratio(samples: dict[str, list[Sample]]) -> float | None:
    """The median over rounds of our wall time over the other tool's in the same round:
    runs side by side share the host's load of the moment, which drifts by more than the
    difference being measured."""
    pairs = [o.wall_s / t.wall_s for o, t in zip(samples["ours"], samples.get("other", []))
             if o.ok and t.ok]
    return statistics.median(pairs) if pairs else None


def median_sample(samples: list[Sample]) -> Sample:
    ok = [s for s in samples if s.ok]
    if not ok:
        return samples[0]
    return Sample(*(statistics.median(getattr(s, f) for s in ok)
                    for f in ("wall_s", "cpu_s", "peak_rss_mb", "read_mb", "written_mb")), True)


def gpu_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        names = []
    return f"the GPU ({names[0].strip()})" if names and names[0].strip() else "the GPU"


def default_tool() -> str:
    """The mergekit-yaml of this Python's environment: a version manager's shim found first
    on PATH (pyenv's is a chain of shell scripts) would add its own start-up to every run."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mergekit-yaml") or "mergekit-yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["small", "large"], default="small")
    ap.add_argument("--quick", action="store_true", help="tiny models, one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded runs of each tool first (default 1; 0 with --quick): "
                    "the first run of a tool compiles and caches its bytecode and brings "
                    "its libraries into the page cache")
    ap.add_argument("--methods", default="linear,ties,slerp,dare_ties,passthrough",
                    help="comma-separated, of: " + ", ".join(recipes([Path()] * 3, 2)))
    ap.add_argument("--tool", default=default_tool(),
                    help="the mergekit-yaml to measure (default: the one installed beside "
                    "this Python, else the one on PATH)")
    ap.add_argument("--compare-with", metavar="PATH", help="another mergekit-yaml to compare")
    ap.add_argument("--cuda", action="store_true",
                    help="pass --cuda to every tool: the math runs on the GPU")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--output", type=Path, help="write the markdown table here too")
    args = ap.parse_args()
    size = "quick" if args.quick else args.size
    runs = 1 if args.quick else args.runs
    warmup = 0 if args.quick else args.warmup
    flags = ("--cuda",) if args.cuda else ()

    models = [args.cache / size / name for name in ("a", "b", "c")]
    for seed, m in enumerate(models):
        build_model(m, seed, size)
    adapter = args.cache / size / "b_lora64"
    if "lora_input" in args.methods.split(",") and not adapter.is_dir():
        extract = Path(args.tool).with_name("mergekit-extract-lora")
        subprocess.run([str(extract), "--model", str(models[1]), "--base-model", str(models[0]),
                        "--out-path", str(adapter), "--max-rank", "64", "-q"], check=True)
    if any(m.startswith("vocab") for m in args.methods.split(",")):
        for seed, name in ((3, "b_vocab"), (4, "c_vocab")):
            models.append(args.cache / size / name)
            build_model(models[-1], seed, size, VOCAB_ADDED[name])
    layers = SIZES[size][2]
    tools = [("ours", args.tool)] + ([("other", args.compare_with)] if args.compare_with else [])
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        work = Path(tmp)
        chosen = {m: r for m, r in recipes(models, layers).items() if m in wanted}
        for _ in range(warmup if chosen else 0):
            for _name, tool in tools:
                run_once(tool, next(iter(chosen.values())), work, flags)
        for method, recipe in chosen.items():
            samples: dict[str, list[Sample]] = {name: [] for name, _ in tools}
            floors = []
            for _ in range(runs):
                for name, tool in tools:  # alternate the tools run by run
                    samples[name].append(run_once(tool, recipe, work, flags))
                out_bytes = int(samples["ours"][-1].written_mb * 1e6)
                floors.append(io_floor(models, out_bytes, work))
            rows.append((method, {n: median_sample(s) for n, s in samples.items()},
                         statistics.median(floors), paired_ratio(samples)))
    table = render(rows, bool(args.compare_with), size + (f"; math on {gpu_name()}" if args.cuda
                                                             else ""))
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0 if all(r[1]["ours"].ok for r in rows) else 1


def render(rows: list, compare: bool, size: str) -> str:
    head = ["method", "wall s", "CPU s", "peak RSS MB", "read() MB", "written MB", "I/O floor s",
            "wall / floor"]
    if compare:
        head += ["other wall s", "other RSS MB", "wall ratio", "RSS ratio"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; models: {size}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s, floor, ratio in rows:
        o = s["ours"]
        cells = [method, f"{o.wall_s:.2f}", f"{o.cpu_s:.2f}", f"{o.peak_rss_mb:.0f}",
                 f"{o.read_mb:.3g}", f"{o.written_mb:.3g}", f"{floor:.2f}",
                 f"{o.wall_s / floor:.1f}x" if floor > 0 else "-"]
        if not o.ok:
            cells[1] = f"FAILED ({o.error[:60]})"
        if compare:
            t = s["other"]
            cells += [f"{t.wall_s:.2f}", f"{t.peak_rss_mb:.0f}",
                      f"{ratio:.2f}x" if ratio is not None else "-",
                      f"{o.peak_rss_mb / t.peak_rss_mb:.2f}x" if t.ok else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "read() MB counts read calls only: a tool that maps its inputs (ours does on "
              "torch; on numpy it reads them) reads them through page faults, which this "
              "column does not see."]
    if compare:
        lines.append("wall ratio: the median of each round's ratio (the two tools run one "
                     "after the other in every round); RSS ratio: of the medians.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
