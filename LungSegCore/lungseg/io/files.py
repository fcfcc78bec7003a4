"""Files and folders: finding the inputs, naming outputs, and writing files atomically.

No image decoding here (that is `io.py`): a run killed at any moment leaves either the old file, the complete new
one, or a hidden `.partial` file, never a truncated output.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import LungSegError

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".dcm",
    ".dicom",
    ".nrrd",
    ".nhdr",
    ".nii",
    ".nii.gz",
    ".mha",
    ".mhd",
)


def suffix_of(path: Path | str) -> str:
    """The file's format suffix, lower case; `.nii.gz` counts as one."""
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: Path | str) -> str:
    """The file name without its format suffix (`.nii.gz` removed whole)."""
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def is_dicom(path: Path) -> bool:
    """A `.dcm`/`.dicom` name, or the DICM marker of a DICOM file without a suffix."""
    if suffix_of(path) in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_path_list(list_file: Path) -> list[Path]:
    """A text file of image paths, one per line (# comments); relative paths are relative to the list's folder."""
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def list_inputs(inputs: list[str | Path], recursive: bool = False) -> list[Path]:
    """Expand files, folders and `.txt` lists of paths into a de-duplicated list of candidate image files."""
    found, seen = [], set()
    for item in inputs:
        item = Path(item)
        if item.is_file() and item.suffix.lower() == ".txt":
            files = read_path_list(item)
        elif item.is_dir():  # a folder named like a file (`study.dcm/`) is still a folder
            pattern = "**/*" if recursive else "*"
            # a subfolder named like an image is an input (an error row that says so) unless --recursive enters it
            files = sorted(
                p
                for p in item.glob(pattern)
                if not p.name.startswith(".")
                and not (recursive and p.is_dir())
                and (suffix_of(p) in IMAGE_SUFFIXES or (p.is_file() and is_dicom(p)))
            )
        else:
            files = [item]
        for f in files:
            key = os.path.abspath(f)  # not resolve(): two links to one file are two inputs
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


PARTIAL = ".partial"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside `path` (same suffix, so writers pick the same format); rename it to `path`
    only if the block succeeds. A file system left with no free block fails it with ENOSPC: ITK does not check
    `fclose`, so on a full disk it can end a file short, even at 0 bytes, without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL}{suffix_of(path)}")
    try:
        yield tmp
        if free_bytes(tmp.parent) == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_partial_files(path: str | Path) -> None:
    """Remove what a writer of `path` killed within `atomic_path` left: only that path's own temporary names, so a
    writer of another file in the folder (another shard's) is left alone."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL}*"):
        tmp.unlink(missing_ok=True)


def prepare_output_folder(folder: str | Path) -> None:
    """Create `folder` with its parents and check that a file can be written there, before any work: LungSegError
    naming the folder and the reason (a path through a file, no permission, a read-only file system, a full disk)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LungSegError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lungseg-write-test-") as probe:
            probe.write(b"lungseg")
            probe.flush()
    except OSError as exc:
        raise LungSegError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from exc


OUT_OF_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# Conditions of the whole output folder rather than of one input: a batch stops on them instead of failing every input.
FATAL_WRITE_ERRNOS = (*OUT_OF_SPACE, errno.EROFS, errno.EACCES, errno.EPERM)


def free_bytes(folder: str | Path) -> int | None:
    """Bytes this process may still write in `folder`'s file system (root may use the reserved blocks); None where
    unknown (Windows)."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    blocks = stat.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stat.f_bavail
    return blocks * stat.f_frsize


def raise_if_out_of_space(path: str | Path, exc: BaseException) -> None:
    """Raise OSError(ENOSPC) from `exc`, the failure of a library writer (ITK says "couldn't write gzip data"), when
    the file system of `path` is full: less than 1 MiB left while the partial file still stands."""
    free = free_bytes(Path(path).parent)
    if "No space left" in str(exc) or (free is not None and free < (1 << 20)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


def write_atomic_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(rows: list[dict], fields: list[str], path: str | Path) -> None:
    """A CSV of `rows` (keys outside `fields` left out), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic_text(buffer.getvalue(), path)


CHECKPOINTS = ("best", "last")  # a training run's checkpoints, <name>.pt: best validation score, final epoch


def checkpoint_file(weights: str) -> str:
    """The file name of a run's checkpoint `weights` (best.pt or last.pt); another name is a clear error."""
    if weights not in CHECKPOINTS:
        raise LungSegError(f"weights '{weights}': choose {' or '.join(CHECKPOINTS)}")
    return f"{weights}.pt"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """`torch.save` through `atomic_path`: a run killed while saving keeps the previous checkpoint whole. For the
    training checkpoints and the data caches (read back with `torch.load(..., weights_only=True)`)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
