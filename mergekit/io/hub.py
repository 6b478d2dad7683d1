"""Hub references through huggingface_hub's standard cache (honours HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE); the cache folder can be overridden per run."""

from __future__ import annotations

from pathlib import Path

from mergekit.errors import MergeError, merge_failure, usage_error
from mergekit.refs import ModelReference

# Small files fetched first: config, tokenizer, generation config, shard indexes.
SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def fetch_small_files(ref: ModelReference, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            ref.path, revision=ref.revision, cache_dir=cache_dir, allow_patterns=SMALL_FILES
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        raise _hub_error(ref, None, exc, cache_dir) from None
    return Path(folder)


def fetch_file(ref: ModelReference, filename: str, cache_dir: str | None) -> Path | None:
    """Download (or find in the cache) one file; None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(
            hf_hub_download(ref.path, filename, revision=ref.revision, cache_dir=cache_dir)
        )
    except EntryNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        if _offline_missing(exc):
            return None
        raise _hub_error(ref, filename, exc, cache_dir) from None


def _offline_missing(exc: Exception) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(exc, LocalEntryNotFoundError)


def _hub_error(
    ref: ModelReference, filename: str | None, exc: Exception, cache_dir: str | None
) -> MergeError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"model '{ref}'" + (f", file {filename}" if filename else "")
    if isinstance(exc, GatedRepoError):
        return usage_error(what, "the repository is gated",
                           "accept its terms on the hub and log in (huggingface-cli login)")
    if isinstance(exc, RepositoryNotFoundError):
        return usage_error(what, "not a local folder and not found on the hub",
                           "check the path or repo id (and your login for private repos)")
    if isinstance(exc, RevisionNotFoundError):
        return usage_error(what, f"revision {ref.revision!r} not found", "check the revision")
    if isinstance(exc, LocalEntryNotFoundError):
        mode = "offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "no connection"
        return usage_error(
            what, f"not a local folder and not in the hub cache ({mode})",
            f"check the path, or download it first (cache: {cache_dir or constants.HF_HUB_CACHE})")
    return merge_failure(what, f"hub download failed ({type(exc).__name__}: {exc})",
                         "check the connection and try again")
