"""Bases named by a Hugging Face hub id (``org/name``, optional ``@revision``), found offline
in the local cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``) through ``huggingface_hub``.
Never touches the network: ``snapshot_download(..., local_files_only=True)``."""

from __future__ import annotations

import os
import re
from pathlib import Path

# a repo id (``org/name`` or a legacy ``name``) and an optional revision (branch, tag, sha)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of ``org/name[@revision]``, or None if it is not one."""
    m = _HUB_ID.match(text.strip())
    return (m["repo"], m["rev"]) if m else None


def hub_cache() -> Path:
    """The hub cache folder as the environment says now (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default ``main``), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), local_files_only=True)
    except Exception:  # not cached, an invalid id, an incomplete snapshot: not found here
        return None
    return Path(path)


def describe(repo_id: str, revision: str | None) -> str:
    """How a lookup is named in messages: ``'org/name' (revision main) in <cache>``."""
    return f"hub id {repo_id!r} (revision {revision or 'main'}) in the local Hugging Face cache {hub_cache()}"
