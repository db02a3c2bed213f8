"""Small JSON files and folders under a sweep's storage path: a local folder or a URI (``s3://``, ``gs://``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def read_json(path: str) -> Any | None:
    """The parsed file, or ``None`` when it does not exist."""
    if not is_uri(path):
        p = Path(path)
        return json.loads(p.read_text()) if p.is_file() else None
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read().decode())


def write_json(path: str, data: Any) -> None:
    """Write atomically for local paths (temp file + rename); object stores write whole objects anyway."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if not is_uri(path):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".partial")
        tmp.write_text(text)
        tmp.replace(p)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def remove_tree(path: str) -> None:
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(inner)
