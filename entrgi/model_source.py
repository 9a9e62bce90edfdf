"""Where ``from_pretrained`` should look for a model: a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path


def model_source(name_or_path: str, what: str) -> str:
    """``name_or_path`` as ``from_pretrained`` takes it: a local folder (``~`` expanded)
    or a hub id (``name`` or ``org/name``). A path that names no folder and cannot be a
    hub id (absolute, starting with ``.`` or ``~``, or with more than one ``/``) raises
    FileNotFoundError naming ``what`` and the path, instead of the hub's id-format error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local or path.exists():
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such folder (a hub id is 'name' or 'org/name')")
    return name_or_path
