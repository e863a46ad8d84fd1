"""Files on disk: the cache folder, checksums and manifests, and atomic writes.

Everything circuitlab writes for a user (graphs, labels, cards, checkpoints, bundles,
caches) goes through ``atomic_file`` or ``atomic_dir``: the new content is written beside
its destination and renamed into place, so a crash or a full disk leaves either the old
version or the new one, never a mix. Files and folders get the user's umask. Temporary
names carry the writer's process id (``.<name>.<pid>.<random>``), so the next write to the
same place removes what a killed writer left behind, and never a live writer's files.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CircuitlabError


def cache_dir() -> Path:
    """Root of circuitlab's cache: ``$CIRCUITLAB_CACHE`` or ``~/.cache/circuitlab``.

    Raises:
        CircuitlabError: if the cache is a file (or inside one), or is a folder that cannot
            be written and holds nothing to read (a read-only cache that others filled,
            e.g. with models, is fine).
    """
    path = Path(os.environ.get("CIRCUITLAB_CACHE", Path.home() / ".cache" / "circuitlab"))
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK) and not _has_entries(path):
        problem = f"{existing} cannot be written"
    else:
        return path
    raise CircuitlabError(f"The circuitlab cache {path} cannot be used: {problem}. Point "
                          "CIRCUITLAB_CACHE at a writable folder (or unset it for "
                          "~/.cache/circuitlab).")


def _has_entries(folder: Path) -> bool:
    """Whether ``folder`` is a folder with something in it that can be listed."""
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def machine() -> str:
    """This machine's processor as the system names it, and its core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def sha256(path: Path) -> str:
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(folder: Path, what: str, fix: str) -> None:
    """Check every file listed in ``folder/manifest.json`` against its sha256.

    Raises:
        CircuitlabError: naming ``what``, the missing or corrupt file and the ``fix``.
    """
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
        listed = dict(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CircuitlabError(f"{what}: {folder}/manifest.json is unreadable or not a "
                              f"manifest ({err}). {fix}") from err
    for name, expected in listed.items():
        file = Path(folder) / name
        if not file.exists():
            raise CircuitlabError(f"{what}: {file} is missing. {fix}")
        actual = sha256(file)
        if actual != expected:
            raise CircuitlabError(
                f"{what}: {file} fails its checksum (expected {expected[:12]}…, "
                f"got {actual[:12]}…); the file is corrupt. {fix}"
            )


def _temp_prefix(path: Path) -> str:
    """The prefix of this process's temporary names beside ``path``, after removing the
    temporaries that dead writers left there (and a ``replace_dir`` leftover)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.\w+|old)")
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = stale.fullmatch(entry.name)
        if match and not (match[1] and _alive(int(match[1]))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def disk_errors(path: Path, keeps: str) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a ``CircuitlabError`` that says what
    was kept (``keeps``, e.g. "the previous checkpoint is intact.")."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise CircuitlabError(
            f"No space left on the device while writing {path}. Free some space or write "
            f"somewhere else, then run again; {keeps}"
        ) from err


@contextmanager
def atomic_file(path: str | os.PathLike, keeps: str = "the previous file is intact.") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and renamed to
    ``path`` (with the user's umask), on failure removed.

    Example:
        >>> with atomic_file(out) as tmp:
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_errors(path, keeps):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, doc, indent: int | None = 1) -> None:
    """Write ``doc`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(doc, indent=indent, ensure_ascii=False))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False``
    where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the folder ``tmp`` to ``dest``, replacing an existing ``dest``.

    Where the system can swap two paths atomically, ``dest`` always holds the old or the
    new folder; elsewhere (two renames) a crash in between leaves the old one in
    ``.dest.old``.
    """
    if dest.exists() and _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    if dest.exists():
        os.replace(dest, trash)
    os.replace(tmp, dest)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, keeps: str = "the previous folder is intact.",
               carry_except: set[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole
    (with the user's umask), on failure it is removed.

    Args:
        path: the folder to write.
        keeps: what a full disk leaves intact, for the error message.
        carry_except: if given, every entry of an existing ``path`` whose name is not in
            this set is carried into the new folder first (as hard links, so nothing is
            copied and nothing of the old folder is modified): files beside the ones the
            caller writes survive. The caller must write only names in the set, or replace
            carried files by rename (``atomic_file``), never write into them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path)))
    try:
        with disk_errors(path, keeps):
            if carry_except is not None and path.is_dir():
                for entry in path.iterdir():
                    if entry.name in carry_except:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True,
                                        copy_function=os.link)
                    else:
                        os.link(entry, tmp / entry.name, follow_symlinks=False)
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
