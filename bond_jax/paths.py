"""The one path layer of the library and its scripts: local paths and object-store URIs (`gs://`, `s3://`,
`az://`) alike, through `etils.epath` (orbax's own path type) and, for byte ranges, `fsspec`.

Object stores have no atomic rename and no append; every writer of the library therefore writes a file whole
(`write_whole`: one object upload, or a local file written aside and renamed over), and the checkpoints rely on
orbax's commit marker instead of renames (`checkpointing`). A `gs://` path needs the `gcs` extra
(`pip install "bond_jax[gcs]"`, which brings `gcsfs`); `STORAGE_EMULATOR_HOST` points it at an emulator.

Example:
  >>> import tempfile
  >>> run = as_path(tempfile.mkdtemp()) / "run"
  >>> check_workdir(run) == run
  True
  >>> write_whole(run / "report.json", '{"policy": 1}')
  >>> (run / "report.json").read_text(), read_ranges(run / "report.json", [(2, 8)])
  ('{"policy": 1}', [b'policy'])
  >>> as_path("gs://bucket/run") / "config.json"
  PosixGPath('gs://bucket/run/config.json')
  >>> as_path("gz://bucket/run")
  Traceback (most recent call last):
  ...
  bond_jax.paths.PathError: path 'gz://bucket/run': unknown scheme 'gz://'; expected a local path or one of gs://, ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import tempfile
import uuid

from etils import epath
import fsspec

Path = epath.Path
PathLike = str | os.PathLike

# The object stores epath speaks, and the fsspec client each needs (with the extra that installs it, where we have
# one). Other `scheme://` strings would silently become local directories named "scheme:".
CLIENTS = {"gs": ("gcsfs", "bond_jax[gcs]"), "s3": ("s3fs", "s3fs"), "az": ("adlfs", "adlfs")}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What a client raises when a store cannot be reached or refuses us, besides OSError and ValueError.
_CLIENT_ERRORS = {"gs": ("gcsfs.retry:HttpError", "google.auth.exceptions:GoogleAuthError")}
# Directories are listed afresh each time (fsspec would keep a process's first listing for good): other processes
# change them, the other hosts of a run or a resumed run.
for _scheme in CLIENTS:
  fsspec.config.conf.setdefault(_scheme, {}).setdefault("use_listings_cache", False)


class PathError(ValueError):
  """A path that cannot be used: an unknown scheme, a missing client, or a store that refuses or cannot be reached."""


def scheme(path: PathLike) -> str | None:
  """The URI scheme of `path` ("gs" for "gs://bucket/run"), None for a local path.

  Example:
    >>> scheme("gs://bucket/run"), scheme("/tmp/run")
    ('gs', None)
  """
  match = _SCHEME.match(os.fspath(path))
  return match.group(1) if match else None


def is_remote(path: PathLike) -> bool:
  """Whether `path` is an object-store URI (no atomic renames, no appends).

  Example:
    >>> is_remote("gs://bucket/run"), is_remote("run")
    (True, False)
  """
  return scheme(path) is not None


def as_path(path: PathLike) -> Path:
  """`path` as an `epath.Path`: object-store URIs as they are, local paths made absolute (as orbax needs).

  Raises:
    PathError: `path` has a scheme other than those of `CLIENTS`, or its client is not installed.

  Example:
    >>> as_path("gs://bucket/run").name, as_path("run") == as_path(os.path.join(os.getcwd(), "run"))
    ('run', True)

    Without s3fs, `as_path("s3://bucket/run")` raises `PathError: path 's3://bucket/run': s3:// needs the s3fs
    package: pip install 's3fs'.`
  """
  name = scheme(path)
  if name is None:
    return epath.Path(os.path.abspath(os.fspath(path)))
  if name not in CLIENTS:
    raise PathError(f"path {os.fspath(path)!r}: unknown scheme '{name}://'; expected a local path or one of "
                    f"{', '.join(s + '://' for s in CLIENTS)}.")
  package, install = CLIENTS[name]
  if importlib.util.find_spec(package) is None:
    raise PathError(f"path {os.fspath(path)!r}: {name}:// needs the {package} package: pip install '{install}'.")
  return epath.Path(os.fspath(path))


def _client_errors(path: PathLike) -> tuple[type[BaseException], ...]:
  """The exceptions that reading or writing `path` raises when its store is missing, unreachable or refuses us."""
  errors = [OSError, ValueError]
  for qualified in _CLIENT_ERRORS.get(scheme(path), ()):
    module, _, name = qualified.partition(":")
    errors.append(getattr(importlib.import_module(module), name))
  return tuple(errors)


def write_whole(path: PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` so that it is never seen cut short, even if the process dies while writing.

  An object store shows an object only once its upload completes; a local file is written aside and renamed over.
  """
  path = as_path(path)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  aside = path.with_name(f"{path.name}.tmp{os.getpid()}")
  aside.write_bytes(data)
  aside.replace(path)


def read_ranges(path: PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
  """The bytes `[start, end)` of each of `ranges` of the file `path`, read without reading the rest of it (on an
  object store, ranged requests sent concurrently)."""
  if not ranges:
    return []
  fs, location = fsspec.core.url_to_fs(os.fspath(as_path(path)))
  starts, ends = zip(*ranges)
  return fs.cat_ranges([location] * len(ranges), list(starts), list(ends))


def check_workdir(path: PathLike) -> Path:
  """`path` as a directory this process can write to (created if local), checked by writing and deleting a file.

  Called before anything is compiled, so that a wrong bucket or missing credentials fail in seconds, not at the
  first checkpoint hours later.

  Raises:
    PathError: one line naming `path`: an unknown scheme, a missing client, a missing bucket, refused
      credentials, or a store that cannot be reached.
  """
  directory = as_path(path)
  probe = directory / f".bond_jax_write_check.{uuid.uuid4().hex}"  # Every host checks at once.
  try:
    directory.mkdir(parents=True, exist_ok=True)  # Nothing to create on an object store.
    probe.write_bytes(b"")
    probe.unlink()
  except _client_errors(path) as e:
    hint = " (does the bucket exist?)" if is_remote(path) and isinstance(e, FileNotFoundError) else ""
    detail = " ".join(str(e).split())[:300]
    raise PathError(f"the workdir {os.fspath(path)!r} cannot be written{hint}: {type(e).__name__}: {detail}") from e
  return directory


def move_dir(source: PathLike, target: PathLike) -> None:
  """Moves the directory `source` to `target` (parents created): a rename on a local disk, a copy and a delete of
  each object on an object store.

  Example:
    >>> import tempfile
    >>> root = as_path(tempfile.mkdtemp())
    >>> write_whole(root / "3" / "state", b"...")
    >>> move_dir(root / "3", root / "aside" / "3")
    >>> sorted(p.name for p in root.iterdir()), (root / "aside" / "3" / "state").read_bytes()
    (['aside'], b'...')
  """
  source, target = as_path(source), as_path(target)
  if is_remote(source):
    fs, location = fsspec.core.url_to_fs(os.fspath(source))
    fs.mv(location, fsspec.core.url_to_fs(os.fspath(target))[1], recursive=True)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  source.rename(target)


def copy_files(source: PathLike, target: PathLike, skip: Sequence[str] = ()) -> None:
  """Copies the files under the directory `source` (recursively, but those whose name ends with one of `skip`)
  into the directory `target`, each written whole (`write_whole`); either may be local or on an object store.

  Example:
    >>> import tempfile
    >>> source, target = as_path(tempfile.mkdtemp()), as_path(tempfile.mkdtemp())
    >>> write_whole(source / "tokenizer.json", "{}")
    >>> write_whole(source / "model.safetensors", b"weights")
    >>> copy_files(source, target / "copy", skip=(".safetensors",))
    >>> [p.name for p in (target / "copy").iterdir()]
    ['tokenizer.json']
  """
  source, target = as_path(source), as_path(target)
  for entry in source.iterdir():
    if entry.is_dir():
      copy_files(entry, target / entry.name, skip)
    elif not entry.name.endswith(tuple(skip)):
      write_whole(target / entry.name, entry.read_bytes())


@contextlib.contextmanager
def local_copy(path: PathLike, skip: Sequence[str] = ()) -> Iterator[str]:
  """A local directory holding what the directory `path` holds (skipping names that end with one of `skip`): `path`
  itself if it is local, else a temporary copy deleted on exit. For libraries that read local files only
  (transformers' tokenizers).

  Example:
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> with local_copy(directory) as local:
    ...   local == directory
    True
  """
  if not is_remote(path):
    yield os.fspath(as_path(path))
    return
  with tempfile.TemporaryDirectory(prefix="bond_jax_") as local:
    copy_files(path, local, skip)
    yield local


def local_mirror(path: PathLike) -> str:
  """A local directory standing for the remote directory `path` (the same one for the same URI, in the system's
  temporary directory), for files that a library reads locally only; `path` itself if it is local.

  Example:
    >>> local_mirror("gs://bucket/tfds") == local_mirror("gs://bucket/tfds") != local_mirror("gs://bucket/other")
    True
  """
  if not is_remote(path):
    return os.fspath(as_path(path))
  digest = hashlib.sha256(os.fspath(path).encode("utf-8")).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "bond_jax_mirror", digest)
