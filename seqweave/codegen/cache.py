"""On-disk cache of generated kernel modules, keyed by the source's hash, Triton's version and the device.

Triton needs a kernel's source in a real file (it reads it back to parse the AST), and several
ranks of one job often generate the same kernel at the same moment. So each entry is a `.py`
file written atomically (temporary file in the same directory, fsync, `os.replace`): a reader
sees either nothing or a whole file, and concurrent writers of the same key write the same
bytes. Each file starts with a header holding the hash of its body and the Triton version it
was generated for; an entry whose header does not match (truncated, hand-edited, written by
another Triton) is rebuilt rather than trusted. Triton's own cache keeps the compiled binaries.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Mapping

CACHE_DIR_VARIABLE = "SEQWEAVE_CACHE_DIR"
HEADER_PREFIX = "# seqweave-kernel"


def default_cache_dir() -> Path:
    """$SEQWEAVE_CACHE_DIR, else ~/.cache/seqweave/kernels."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "seqweave" / "kernels"


def triton_version() -> str:
    """The installed Triton's version ('none' without Triton: the interpreter-free CPU path)."""
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _header(body: str, version: str, device: str) -> str:
    return f"{HEADER_PREFIX} sha256={_digest(body)} triton={version} device={device}\n"


class KernelCache:
    """Generated modules under `root`, one file per (source, Triton version, device)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self._loaded: dict[tuple, ModuleType] = {}  # per process: a module is executed once
        self.rebuilt: list[Path] = []  # entries found damaged or stale and written again

    def path_for(self, source: str, device: str) -> Path:
        """Where the entry for `source` on `device` lives."""
        key = _digest(f"{source}\0{triton_version()}\0{device}")
        return self.root / key[:2] / f"{key}.py"

    def load(self, source: str, device: str, namespace: Mapping[str, object] | None = None) -> ModuleType:
        """The module for `source`, written to disk first if missing or damaged.

        `namespace` is bound in the module before its code runs (e.g. the `jit` decorator, so
        the same source serves the GPU and the interpreter).
        """
        namespace = namespace or {}
        path = self.path_for(source, device)
        key = (path, tuple(sorted((k, id(v)) for k, v in namespace.items())))
        if key not in self._loaded:
            self._ensure_entry(path, source, device)
            self._loaded[key] = _import_file(path, namespace)
        return self._loaded[key]

    def _ensure_entry(self, path: Path, source: str, device: str) -> None:
        expected = _header(source, triton_version(), device) + source
        if path.exists():
            if _read(path) == expected:
                return
            self.rebuilt.append(path)
        _write_atomically(path, expected)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _import_file(path: Path, namespace: Mapping[str, object]) -> ModuleType:
    """Execute the file as a fresh module (not registered in sys.modules) with `namespace` bound."""
    spec = importlib.util.spec_from_file_location(f"seqweave_kernel_{path.stem[:16]}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the generated kernel module {path}")
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    spec.loader.exec_module(module)
    return module
