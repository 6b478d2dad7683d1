"""Merge options shared by every command that runs a merge (typer annotations)."""

from __future__ import annotations

from typing import Annotated

import typer

Cuda = Annotated[bool, typer.Option("--cuda", help="Do the math on the GPU.")]
Device = Annotated[
    str | None, typer.Option("--device", metavar="DEVICE",
                             help="Torch device for the math, e.g. cuda:1.")
]
OutShardSize = Annotated[
    str, typer.Option("--out-shard-size", metavar="SIZE",
                      help="Largest output shard in bytes; k/M/B suffixes (5B = 5e9).")
]
CopyTokenizer = Annotated[
    bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                       help="Copy the tokenizer files into the output.")
]
AllowCrimes = Annotated[
    bool, typer.Option("--allow-crimes", help="Allow merging models of different architectures.")
]
LazyUnpickle = Annotated[
    bool, typer.Option("--lazy-unpickle", help="Accepted for compatibility (always on).")
]
RandomSeed = Annotated[
    int | None, typer.Option("--random-seed", metavar="N",
                             help="Seed for methods that draw at random.")
]
CloneTensors = Annotated[
    bool, typer.Option("--clone-tensors", help="Accepted for compatibility (no effect).")
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code",
                       help="Accepted for compatibility; no effect: the merge never runs "
                       "model code.")
]
TransformersCache = Annotated[
    str | None, typer.Option("--transformers-cache", metavar="DIR",
                             help="Hub cache folder to use instead of the default.")
]
WriteModelCard = Annotated[
    bool, typer.Option("--write-model-card/--no-write-model-card",
                       help="Write a README.md model card.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show details and tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or info lines.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Check the recipe against the inputs' headers and print "
                       "the plan; read and write no weights.")
]
HashInputs = Annotated[
    bool, typer.Option("--hash-inputs", help="Record the sha256 of local input files in the "
                       "manifest (reads them once more).")
]
StrictFinite = Annotated[
    bool, typer.Option("--strict-finite", help="Fail on NaN or Inf in an input tensor "
                       "instead of warning.")
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Write a merged tensor that holds NaN or Inf "
                       "where its inputs do not (overflow), with a warning, instead of failing.")
]
Resume = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Keep the shards an interrupted run of the "
                       "same merge finished (default), or start over.")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier output in OUT that a different "
                       "recipe or options made (a rerun of the same one replaces it anyway).")
]

LoraOut = Annotated[
    int | None, typer.Option("--lora-out", metavar="RANK",
                             help="Write the merge as a LoRA adapter of the base model, of at "
                             "most this rank (its difference to the base, by truncated SVD).")
]
LoraMergeCache = Annotated[
    str | None, typer.Option("--lora-merge-cache", metavar="DIR",
                             help="Accepted for compatibility; not needed: adapters are "
                             "applied as weights are read.")
]
LoraMergeDtype = Annotated[
    str | None, typer.Option("--lora-merge-dtype", metavar="DTYPE",
                             help="Accepted for compatibility; adapters are applied in "
                             "float32.")
]
