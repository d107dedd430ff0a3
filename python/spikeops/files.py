"""The file rules every reader and writer of spikeops follows (docs/checkpoints.md, "Files and
links"):

- A folder's files are read only when they are regular files inside it. A symbolic link is
  followed only when it resolves inside the folder, or, for a Hugging Face cache snapshot
  (``.../models--org--name/snapshots/<revision>/``), inside that model's cache tree, where the
  snapshot's links point into ``blobs/``.
- Nothing is written through a link or inside the installed package, and nothing appears half
  written: a folder is made whole in a temporary sibling and then renamed into place (a model
  folder that is already there is swapped out whole, never mixed with the new files); a file is
  written under a temporary name in its folder and renamed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, Path]
PACKAGE = Path(__file__).resolve().parent
# Temporary siblings are named .<name>.tmp-<pid>-<random> or .<name>.old-<pid>-<random>, so that
# those of a process that was killed can be recognised and removed by the next writer.
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*")
STALE_S = 600  # seconds after which a dead writer's temporary sibling is cleaned up


def cache_root(folder: Path) -> Path:
    """The tree that links inside ``folder`` may resolve into: the folder itself, or the model's
    cache folder when ``folder`` is a Hugging Face cache snapshot."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def input_file(fn: str, folder: PathLike, name: str) -> Path:
    """``folder / name`` checked for reading: a relative name, and a regular file once any link
    is resolved, which lies inside ``cache_root(folder)``; ValueError otherwise (a missing file
    included)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or \
            ".." in Path(name).parts:
        raise ValueError(f"{fn}: {name!r} must be a file name inside {folder}")
    path = folder / name
    root = cache_root(folder)
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ValueError(f"{fn}: {path} is a link to {real}, outside {root}: links are followed "
                         f"only inside the folder (or a Hugging Face cache's model tree)")
    if not real.is_file():
        raise ValueError(f"{fn}: {path} must be a regular file")
    return path


def has_file(fn: str, folder: PathLike, name: str) -> bool:
    """Whether ``folder`` holds ``name`` (a link counts, and is checked by ``input_file``)."""
    path = Path(folder) / name
    if not (path.exists() or path.is_symlink()):
        return False
    input_file(fn, folder, name)
    return True


def check_output(fn: str, path: PathLike) -> Path:
    """``path`` as a place to write: not a link, not inside the installed package."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{fn}: {path} is a symbolic link; spikeops never writes through links")
    real = path.resolve()
    if real == PACKAGE or real.is_relative_to(PACKAGE):
        raise ValueError(f"{fn}: {path} lies inside the installed spikeops package "
                         f"({PACKAGE}), which is never written; give a folder elsewhere")
    return path


def write_file(fn: str, path: PathLike, write: Callable[[Path], object]) -> Path:
    """``path`` written whole: ``write(tmp)`` fills a new temporary file beside it (created
    exclusively, so never a link), which is then renamed over ``path``."""
    path = check_output(fn, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        _written(fn, path, Path(tmp), write)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would be kept by the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder(fn: str, out: PathLike, make: Callable[[Path], object],
                 marker: str = "config.json") -> Path:
    """``out`` made whole by ``make(tmp)`` in a new temporary sibling folder, then renamed into
    place. ``out`` may be absent, empty, or a folder this kind of writer made before (it holds
    ``marker``): that one is swapped out whole, so that ``out`` never mixes two generations
    (an old calibration or tokenizer beside new weights). Any other non-empty folder is refused
    rather than deleted."""
    out = check_folder_target(fn, out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    old = None
    try:
        _written(fn, out, tmp, make)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would be kept by the rename
        if out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-",
                                        dir=out.parent))
            os.replace(out, old)     # rename(2): replaces the empty placeholder
        os.replace(tmp, out)         # rename(2) replaces an absent or empty folder
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)     # the new folder did not arrive: the old one goes back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def check_folder_target(fn: str, out: PathLike, marker: str = "config.json") -> Path:
    """What ``write_folder`` refuses, checked before the work that fills the folder is done."""
    out = check_output(fn, out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{fn}: {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise ValueError(f"{fn}: {out} holds files but no {marker}; refusing to replace it: "
                             f"give a new or empty folder, or one spikeops wrote")
    return out


def _written(fn: str, final: Path, tmp: Path, write) -> None:
    """``write(tmp)``, with the temporary name replaced by the final one in error messages and
    a failing safetensors writer reported as the OSError it is (disk full, file size limit)."""
    from safetensors import SafetensorError
    try:
        write(tmp)
    except SafetensorError as e:
        raise OSError(f"{fn}: writing {final} failed: {e}".replace(str(tmp), str(final))) from e
    except (ValueError, TypeError, OSError) as e:
        if str(tmp) not in str(e):
            raise
        message = str(e).replace(str(tmp), str(final))
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, message) from e  # errno kept for callers that test it
        raise type(e)(message) from e


def remove_stale(out: Path) -> None:
    """Clean up after writers of ``out`` that were killed: their process is gone and their
    sibling is older than STALE_S (a process of another machine or container writing to a
    shared folder has another pid space; the age keeps its work in progress). A killed swap's
    old folder goes back to ``out`` when ``out`` is missing; other temporaries are removed."""
    for path in out.parent.glob(f".{glob_escape(out.name)}.*-*-*"):
        match = _TEMP.fullmatch(path.name)
        if match is None or match["name"] != out.name or _alive(int(match["pid"])) or \
                time.time() - path.lstat().st_mtime < STALE_S:
            continue
        if match["kind"] == "old" and not (out.exists() or out.is_symlink()):
            os.replace(path, out)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
