"""Resolve a model source (local dir, ``s3://`` prefix, hub id) to a local directory.

Also owns the two rules every source obeys: weights are safetensors only (pickle files can
run code when loaded, so they are refused), and a fingerprint identifies the weights.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedjob.errors import CheckpointError, ModelSourceError

logger = logging.getLogger(__name__)

# Files that describe a model without its weights: enough for ModelSpec and the tokenizer.
SMALL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",  # the model card: its front matter names the licence
    "*_Pooling/config.json",
    "*_Dense/config.json",
    "*/adapter_config.json",
)
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")
# Pickle-based weight formats: never loaded, only named when they are all a source offers.
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# The two ways past a pickle-only checkpoint, named by every refusal.
PICKLE_WAYS_OUT = (
    "pass a hub revision that has safetensors (--revision REV, or MODEL@REV), or convert "
    "them once with `embedjob convert-weights SRC DST` (torch.load(weights_only=True) -> "
    "safetensors) and use DST"
)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
CACHE_ENV = "EMBEDJOB_CACHE"
MANIFEST = ".embedjob-manifest.json"
_HASH_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True, kw_only=True)
class ResolvedSource:
    """A model source made local.

    Attributes:
        source: The source as the caller gave it.
        local_dir: Local directory holding the fetched files.
        fingerprint: Stable hash identifying the weights (see ``resolve``).
        revision: Hub commit when the source is a hub id, else None.
    """

    source: str
    local_dir: str
    fingerprint: str
    revision: str | None


def resolve(source: str, *, filesystem: Any = None, weights: bool) -> ResolvedSource:
    """Make ``source`` local.

    Fingerprints: local dirs hash the safetensors files' content; ``s3://`` hashes the
    objects' ETag and size; hub ids hash the repo id and snapshot commit (content-addressed).

    Args:
        source: Local directory, ``s3://bucket/prefix`` or hub id (``org/name[@revision]``).
        filesystem: fsspec filesystem for ``s3://`` (default ``s3fs.S3FileSystem()``).
        weights: Also fetch the weight files; False fetches only config and tokenizer files.

    Returns:
        The local directory, fingerprint and revision.

    Raises:
        ModelSourceError: The source cannot be found or read.
        CheckpointError: The source has no safetensors weights.
    """
    if source.startswith("s3://"):
        return _resolve_s3(source, filesystem, weights)
    path = Path(source).expanduser()
    if path.is_dir():
        files = weight_files(path)
        return ResolvedSource(
            source=source, local_dir=str(path.resolve()), fingerprint=_hash_files(path, files),
            revision=None,
        )
    if HUB_ID.fullmatch(source) and not path.exists():
        return _resolve_hub(source, weights)
    raise ModelSourceError(
        f"model source {source!r} is not a local directory, an s3:// prefix or a hub id "
        "like 'jinaai/jina-embeddings-v3'"
    )


def is_weight_file(rel: str) -> bool:
    """Top-level ``*.safetensors``, a task adapter's ``<task>/adapter_model.safetensors`` or a
    sentence-transformers Dense module's ``<n>_Dense/model.safetensors``."""
    parts = rel.split("/")
    if len(parts) == 1:
        return rel.endswith(".safetensors")
    if len(parts) == 2 and re.fullmatch(r"\d+_Dense", parts[0]):
        return parts[1] == "model.safetensors"
    return len(parts) == 2 and parts[1] == "adapter_model.safetensors"


def weight_files(local_dir: Path) -> list[Path]:
    """The safetensors weight files of ``local_dir`` (sorted), refusing pickle-only dirs.

    Only top-level files and adapter subfolders count; other nested files (e.g. a copy in
    another dtype) are not part of this checkpoint.

    Raises:
        CheckpointError: No top-level ``*.safetensors``; names any pickle files found instead.
    """
    files = sorted(p for p in local_dir.rglob("*.safetensors")
                   if p.is_file() and is_weight_file(p.relative_to(local_dir).as_posix()))
    if any(p.parent == local_dir for p in files):
        return files
    pickles = sorted(
        p.name for p in local_dir.iterdir() if p.is_file() and _matches(p.name, PICKLE_PATTERNS)
    )
    if pickles:
        raise CheckpointError(
            f"no *.safetensors weights in {local_dir}; found pickle weights {pickles}. Only "
            f"safetensors are loaded (pickle files can run code when loaded): {PICKLE_WAYS_OUT}"
        )
    raise CheckpointError(f"no *.safetensors weights in {local_dir} (if the source offers "
                          f"only pickle weights: {PICKLE_WAYS_OUT})")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _hash_files(root: Path, files: list[Path]) -> str:
    """sha256 over (relative path, content) of ``files``; memoised on (path, size, mtime)."""
    stats = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files_cached(str(root), stats)


@functools.lru_cache(maxsize=32)
def _hash_files_cached(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, _, _ in stats:
        digest.update(rel.encode() + b"\0")
        with open(Path(root) / rel, "rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def cache_dir_for(uri: str) -> Path:
    """Local cache dir of a remote source: ``$EMBEDJOB_CACHE`` or ~/.cache/embedjob/models."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "embedjob" / "models"
    return Path(root) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:32]


# --- s3 -------------------------------------------------------------------------------


def _resolve_s3(uri: str, filesystem: Any, weights: bool) -> ResolvedSource:
    fs = filesystem if filesystem is not None else _default_s3fs()
    prefix = uri[len("s3://"):].rstrip("/")
    objects = _list_s3(fs, uri, prefix)
    weight_objs = {r: o for r, o in objects.items() if is_weight_file(r)}
    if not any("/" not in r for r in weight_objs):
        pickles = sorted(r for r in objects if _matches(r, PICKLE_PATTERNS))
        hint = (f"; found pickle weights {pickles}, which are never loaded: {PICKLE_WAYS_OUT}"
                if pickles else "")
        raise CheckpointError(f"no *.safetensors weights under {uri}{hint}")
    digest = hashlib.sha256()
    for rel in sorted(weight_objs):
        etag, size = weight_objs[rel]
        digest.update(f"{rel}\0{etag}\0{size}\n".encode())
    fetch = {r: o for r, o in objects.items()
             if _matches(r, SMALL_FILE_PATTERNS) or (weights and r in weight_objs)}
    local = cache_dir_for(uri)
    _sync_s3(fs, uri, prefix, fetch, local)
    return ResolvedSource(source=uri, local_dir=str(local), fingerprint=digest.hexdigest(),
                          revision=None)


def _default_s3fs() -> Any:
    """s3fs with the standard AWS environment (keys, region, AWS_ENDPOINT_URL)."""
    import s3fs

    return s3fs.S3FileSystem()


def _list_s3(fs: Any, uri: str, prefix: str) -> dict[str, tuple[str, int]]:
    """{relative path: (etag, size)} of every object under ``prefix``."""
    try:
        listing = fs.find(prefix, detail=True)
    except (OSError, ValueError) as e:  # s3fs maps botocore errors to OSError subclasses
        raise ModelSourceError(f"cannot list model source {uri}: {type(e).__name__}: {e}") from e
    objects = {}
    for path, info in listing.items():
        rel = path[len(prefix):].lstrip("/")
        if rel and info.get("type", "file") == "file":
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            objects[rel] = (etag, int(info.get("size") or 0))
    if not objects:
        raise ModelSourceError(f"model source {uri} has no objects")
    return objects


def _sync_s3(fs: Any, uri: str, prefix: str, fetch: dict[str, tuple[str, int]],
             local: Path) -> None:
    """Download what changed since the last sync (by ETag and size) into ``local``."""
    local.mkdir(parents=True, exist_ok=True)
    manifest_path = local / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for rel, (etag, size) in sorted(fetch.items()):
        target = local / rel
        if manifest.get(rel) == [etag, size] and target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        logger.info("downloading %s/%s (%d bytes)", uri.rstrip("/"), rel, size)
        try:
            fs.get(f"{prefix}/{rel}", str(tmp))
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"cannot download {uri.rstrip('/')}/{rel}: {e}") from e
        os.replace(tmp, target)  # atomic: concurrent workers never see half a file
        manifest[rel] = [etag, size]
    tmp_manifest = manifest_path.with_name(f"{MANIFEST}.{os.getpid()}.part")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp_manifest, manifest_path)


# --- hub ------------------------------------------------------------------------------


def _resolve_hub(source: str, weights: bool) -> ResolvedSource:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = source.partition("@")
    patterns = list(SMALL_FILE_PATTERNS + (WEIGHT_PATTERNS if weights else ()))
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=patterns))
    except _hub_errors() as e:
        raise ModelSourceError(
            f"cannot fetch model {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "The hub is unreachable or offline (HF_HUB_OFFLINE) and the model is not cached: "
            "download it once and pass its local directory (or an s3:// prefix) instead"
        ) from e
    if weights:
        weight_files(path)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    ident = f"hub\0{repo_id}\0{commit or path}"
    return ResolvedSource(source=source, local_dir=str(path),
                          fingerprint=hashlib.sha256(ident.encode()).hexdigest(), revision=commit)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What snapshot_download raises when the hub or the cache cannot serve a repo."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)  # HfHubHTTPError is OSError
    try:
        import httpx

        errors += (httpx.HTTPError,)  # transport errors that huggingface_hub lets through
    except ImportError:
        pass
    return errors
