"""Which checkpoints may be read.

A DCP checkpoint's `.metadata` file is a pickle, and unpickling runs whatever code the file
names: a checkpoint folder is code. moedpo signs what it writes: beside `.metadata` it puts
`moedpo-manifest.json` with the file's SHA-256 and an HMAC of it under a key of this
machine's user (`~/.config/moedpo/checkpoint.key`, made on first use, mode 600; or the
`MOEDPO_CHECKPOINT_KEY` environment variable, the same on every host of a multi-host job).
Before a checkpoint is read for training (resume, `checkpoint_manager_path`) its manifest
must verify, unless its folder is under a trusted path: the run's own checkpoint folder and
`checkpoint.trusted_paths`. Written by hand because no library signs DCP folders; HMAC-SHA256
from the standard library is the whole of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

MANIFEST = "moedpo-manifest.json"
KEY_ENV = "MOEDPO_CHECKPOINT_KEY"


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint that is neither signed by this key nor under a trusted path."""


def _key() -> bytes:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "moedpo" / \
        "checkpoint.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # exclusive create: two processes starting at once agree on one key
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass
    return path.read_text().strip().encode()


def _digest(fs, root: str) -> str:
    with fs.open(f"{root}/.metadata", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sign(path: str) -> None:
    """Write the manifest of the DCP checkpoint at `path` (local or URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    digest = _digest(fs, root)
    mac = hmac.new(_key(), digest.encode(), hashlib.sha256).hexdigest()
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump({"metadata_sha256": digest, "hmac": mac}, f)


def _under(path: str, prefix: str) -> bool:
    norm = lambda p: str(p).removeprefix("file://").rstrip("/")  # noqa: E731
    path, prefix = norm(path), norm(prefix)
    if "://" not in path:
        path, prefix = os.path.realpath(path), os.path.realpath(os.path.expanduser(prefix))
    return path == prefix or path.startswith(prefix + "/")


def check(path: str, trusted: list[str], what: str) -> None:
    """Raise UntrustedCheckpoint unless `path` is under a trusted path or carries a manifest
    that verifies under this key and matches its `.metadata`."""
    if any(_under(path, prefix) for prefix in trusted if prefix):
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    try:
        with fs.open(f"{root}/{MANIFEST}") as f:
            manifest = json.load(f)
        digest = _digest(fs, root)
        expected = hmac.new(_key(), digest.encode(), hashlib.sha256).hexdigest()
        if manifest.get("metadata_sha256") == digest and hmac.compare_digest(
                str(manifest.get("hmac", "")), expected):
            return
        reason = "its manifest does not verify under this machine's key"
    except (OSError, ValueError):
        reason = f"it has no readable {MANIFEST}"
    raise UntrustedCheckpoint(
        f"{what}={path}: not read, {reason}. Its .metadata is a pickle, which runs code when "
        "read: if you trust the folder, add it to checkpoint.trusted_paths (or set "
        f"{KEY_ENV} to the key that signed it)")
