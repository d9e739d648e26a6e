"""Crash-safe checkpoint folders: a save is complete or it does not exist.

Every multi-file checkpoint in moekit (ViT trainer, upcycled models, expert-parallel shards) is written with
:class:`CheckpointWriter` into this layout::

    folder/
        manifest.json          the commit point: format, kind, save id, every file with its size and checksum
        save-<save id>/        the files of that save (model.safetensors, config.json, ...)

A save writes its files into a fresh ``save-<id>`` directory, fsyncs them, and then replaces ``manifest.json``
atomically (temporary file + ``os.replace``). Until that rename the previous manifest, and the previous save's
directory it names, are untouched, so a crash at any point leaves exactly the previous save or exactly the new one.
After the rename the previous directory is deleted; anything a crash left behind (an unfinished ``save-*``
directory, a temporary manifest) is never read and is removed by the next save into the folder
(:func:`clean_checkpoint` does it on demand).

Loading (:func:`read_checkpoint`) checks the manifest's own checksum, its format and kind, and every file's size
and checksum (sha256; pass ``verify=False`` to skip the hashing for huge checkpoints, sizes are still checked).
Files are created with the process umask. An unreadable file raises :class:`PermissionError`, never a
"corrupt checkpoint" error. Two processes saving into one folder at the same time is not supported.

Small API, also for other writers (e.g. DCP)::

    write_checkpoint(folder, {"a.bin": b"...", "b.safetensors": lambda path: save_file(t, path)}, kind="x/1")
    ck = read_checkpoint(folder, kind="x/1")     # verified
    ck.path("a.bin"), ck.meta, ck.save_id

Several processes can write one save: give every :class:`CheckpointWriter` the same ``save_id``, gather their
:attr:`CheckpointWriter.entries`, and let one of them :meth:`~CheckpointWriter.commit` with ``entries=`` all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

MANIFEST = "manifest.json"
FORMAT = "moekit.checkpoint"
VERSION = 1
SAVE_PREFIX = "save-"
_CHUNK = 1 << 20

FileData = Union[bytes, Callable[[Path], object]]  # the bytes, or a function that writes the file at the given path


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, modified, or does not belong to the model or run loading it."""


class NoManifestError(CheckpointError, FileNotFoundError):
    """The folder has no ``manifest.json`` (not a checkpoint, or one written before moekit had manifests)."""


# -- small file helpers ------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _hasher(name: str):
    if name == "sha256":
        return hashlib.sha256()
    if name == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise CheckpointError("this checkpoint uses xxh3_128 checksums: pip install xxhash") from None
        return xxhash.xxh3_128()
    raise CheckpointError(f"unknown checksum algorithm {name!r} (known: sha256, xxh3_128)")


def default_hash() -> str:
    """``xxh3_128`` when the ``xxhash`` package is installed (much faster), else ``sha256``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def _read_error(path: Path, e: OSError) -> OSError:
    if isinstance(e, PermissionError):
        return PermissionError(e.errno, f"cannot read checkpoint file {path}: permission denied "
                                        "(the checkpoint itself may be fine)")
    return e


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """The hex checksum of a file."""
    h = _hasher(algo)
    path = Path(path)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise _read_error(path, e) from None
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then move it onto ``path`` with
    ``os.replace``. On any error the temporary file is removed and ``path`` is left as it was. The file gets the
    mode a plain ``open`` would give it (0666 minus the umask)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours the umask, unlike mkstemp
    try:
        write(tmp)
        _plain_mode(tmp, _umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def _plain_mode(path: Path, mask: int) -> None:
    """Give ``path`` the mode ``open`` would (0666 minus the umask): some writers (safetensors) create 0600."""
    os.chmod(path, 0o666 & ~mask)


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}, sort_keys=True).encode()


# -- writing ---------------------------------------------------------------------------------------------------
def clean_checkpoint(folder: str | os.PathLike, *, keep: Iterable[str] = ()) -> list[Path]:
    """Remove what interrupted saves left in ``folder``: ``save-*`` directories the manifest does not name (and
    not in ``keep``) and temporary ``.*.tmp`` files. Returns the removed paths. Never touches the current save."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    keep = set(keep)
    try:
        keep.add(json.loads((folder / MANIFEST).read_text())["dir"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        # an unreadable manifest: keep every save directory, a human should look
        keep.update(p.name for p in folder.iterdir() if p.name.startswith(SAVE_PREFIX))
    removed = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(SAVE_PREFIX) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "digest": self.digest}


class CheckpointWriter:
    """Writes one save into ``folder``: :meth:`write` each file, then :meth:`commit`. Used as a context manager,
    an exception before the commit removes the unfinished save and leaves the previous one as it was.

    ``clean`` (default True) removes leftovers of interrupted saves first; in a multi-process save only one
    process should clean. ``save_id`` must be shared by all processes writing one save (default: a new uuid).
    """

    def __init__(self, folder: str | os.PathLike, *, kind: str, save_id: str | None = None, clean: bool = True,
                 hash: str | None = None) -> None:
        self.folder, self.kind = Path(folder), kind
        self.save_id = save_id or uuid.uuid4().hex
        self.hash = hash or default_hash()
        _hasher(self.hash)
        self.dir_name = SAVE_PREFIX + self.save_id
        self.folder.mkdir(parents=True, exist_ok=True)
        if clean:
            clean_checkpoint(self.folder, keep=[self.dir_name])
        self.staging = self.folder / self.dir_name
        self.staging.mkdir(exist_ok=True)
        self.entries: dict[str, FileEntry] = {}
        self.committed = False
        self._mask = _umask()

    def write(self, name: str, data: FileData) -> FileEntry:
        """Write one file of the save (``bytes``, or a function that writes the file at the path it is given)."""
        if not name or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"CheckpointWriter.write: bad file name {name!r} (a plain name, not hidden, no '/')")
        path = self.staging / name
        if isinstance(data, (bytes, bytearray, memoryview)):
            with open(path, "wb") as f:
                f.write(data)
        elif callable(data):
            data(path)
        else:
            raise TypeError(f"CheckpointWriter.write({name!r}): data must be bytes or a callable, got {type(data)}")
        _plain_mode(path, self._mask)
        _fsync_file(path)
        entry = FileEntry(name, path.stat().st_size, file_digest(path, self.hash))
        self.entries[name] = entry
        return entry

    def commit(self, meta: Mapping[str, Any] | None = None, *, entries: Iterable[FileEntry] = (),
               remove: Iterable[str] = ()) -> "Checkpoint":
        """Make the save current: one atomic replace of ``manifest.json``. ``entries``: files other processes wrote
        into this save's directory. ``remove``: top-level files of an old checkpoint layout deleted afterwards.
        Then the previous save directory is deleted."""
        all_entries = dict(self.entries)
        for e in entries:
            all_entries[e.name] = e
        for e in all_entries.values():  # a file another process announced must be there
            if not (self.staging / e.name).is_file():
                raise CheckpointError(f"commit: {self.staging / e.name} is missing")
        _fsync_dir(self.staging)
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "save_id": self.save_id, "dir": self.dir_name,
            "hash": self.hash, "files": {n: all_entries[n].to_json() for n in sorted(all_entries)},
            "meta": dict(meta or {}),
        }
        manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(self.folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.committed = True
        clean_checkpoint(self.folder)  # the previous save and any leftovers
        for name in remove:
            (self.folder / name).unlink(missing_ok=True)
        return Checkpoint(self.folder, manifest)

    def abort(self) -> None:
        """Remove this (uncommitted) save's files."""
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def write_checkpoint(folder: str | os.PathLike, files: Mapping[str, FileData], *, kind: str,
                     meta: Mapping[str, Any] | None = None, remove: Iterable[str] = ()) -> "Checkpoint":
    """Write ``files`` (name -> bytes or writer function) as one new save of ``folder``; see the module docstring."""
    with CheckpointWriter(folder, kind=kind) as w:
        for name, data in files.items():
            w.write(name, data)
        return w.commit(meta, remove=remove)


# -- reading ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A committed save: ``folder``, its parsed ``manifest``; :meth:`path` gives a file's location."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def save_id(self) -> str:
        return self.manifest["save_id"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def files(self) -> list[str]:
        return list(self.manifest["files"])

    def path(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise CheckpointError(f"checkpoint {self.folder} has no file {name!r} (it has {self.files})")
        return self.folder / self.manifest["dir"] / name

    def verify(self, names: Iterable[str] | None = None, *, checksums: bool = True) -> None:
        """Check that each file (default: all) exists with the recorded size and, with ``checksums``, checksum."""
        for name in self.files if names is None else names:
            info, path = self.manifest["files"][name], self.path(name)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {self.folder}: {path} is missing (deleted after the save?)") from None
            if size != info["size"]:
                raise CheckpointError(f"checkpoint {self.folder}: {name} has {size} bytes, the manifest says "
                                      f"{info['size']} (truncated or overwritten)")
            if checksums and file_digest(path, self.manifest["hash"]) != info["digest"]:
                raise CheckpointError(
                    f"checkpoint {self.folder}: {name} does not match its {self.manifest['hash']} checksum in "
                    f"{MANIFEST} (corrupted, edited, or copied from another save); refusing to load it"
                )


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_checkpoint(folder: str | os.PathLike, *, kind: str | None = None, verify: bool = True) -> Checkpoint:
    """The current save of ``folder``, checked: the manifest's own checksum, format, ``kind`` (when given), and
    every file's size and (with ``verify``, the default) checksum. Raises :class:`CheckpointError` (or
    :class:`NoManifestError`, :class:`PermissionError`) with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoManifestError(
            f"{folder} has no {MANIFEST}: not a moekit checkpoint, or an unfinished first save") from None
    except OSError as e:
        raise _read_error(path, e) from None
    try:
        manifest = json.loads(text)
        ok = manifest.get("manifest_sha256") == hashlib.sha256(_canonical(manifest)).hexdigest()
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {path}: {e}") from None
    if not ok:
        raise CheckpointError(f"corrupt checkpoint manifest {path}: its checksum does not match (edited or damaged)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is "
                              f"not supported (this moekit reads {FORMAT!r} version {VERSION})")
    if kind is not None and manifest.get("kind") != kind:
        raise CheckpointError(f"{folder} holds a {manifest.get('kind')!r} checkpoint, expected {kind!r}")
    ck = Checkpoint(folder, manifest)
    ck.verify(checksums=verify)
    return ck
