"""Build a C kernel into a shared library once per machine and load it with ``ctypes``.

Graph mode already compiles C++ at run time (inductor's CPU backend), so a C compiler is a
dependency of the fast CPU paths either way; this module reuses it for scission's own CPU
kernels (``kernels/*.c``) without torch's headers, so a build takes about a second. The
library is cached under ``cache_dir()/kernels`` keyed by the source, the flags, the compiler's
version and this CPU's model and flags (``-march=native`` code must not move to another CPU
through a shared home directory). Concurrent builders (several workers starting at once)
each write their own temporary file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120


class KernelBuildError(RuntimeError):
    """No C compiler, or the build failed; the message says which and how to fix it."""


def cache_dir() -> Path:
    """Scission's cache folder (``$SCISSION_CACHE_DIR`` or ``~/.cache/scission``)."""
    return Path(os.environ.get("SCISSION_CACHE_DIR", Path.home() / ".cache" / "scission"))


def compiler() -> str:
    """The C compiler: ``$CC``, else ``gcc``, else ``cc`` on PATH.

    Raises:
        KernelBuildError: none is found.
    """
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise KernelBuildError("no C compiler found (set CC or install gcc)")
    return cc


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))  # first CPU's lines


def build_shared_library(source: Path, flags: tuple[str, ...], deps: tuple[Path, ...] = ()
                         ) -> Path:
    """Compile ``source`` with ``flags`` (plus ``-shared -fPIC``) unless a cached build exists.
    ``deps``: files ``source`` includes; their text is part of the cache key.

    Returns: the path of the shared library.
    Raises:
        KernelBuildError: no compiler, or it failed (its output is in the message).
    """
    cc = compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"C compiler {cc!r} does not run: {e}") from e
    texts = [source.read_text(), *(d.read_text() for d in deps)]
    key = hashlib.sha256("\0".join([*texts, *flags, version, _cpu_identity()])
                         .encode()).hexdigest()[:20]
    out_dir = cache_dir() / "kernels"
    target = out_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(source)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"building {source.name} failed: {e}") from e
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"building {source.name} failed ({' '.join(cmd)}):\n"
                               f"{done.stderr.strip()[-2000:]}")
    os.replace(tmp, target)
    logger.info("built %s in %.1f s: %s", source.name, time.perf_counter() - start, target)
    return target


def load_library(source: Path, flags: tuple[str, ...], deps: tuple[Path, ...] = ()
                 ) -> ctypes.CDLL:
    """``build_shared_library`` then ``ctypes.CDLL`` (raises ``KernelBuildError``)."""
    path = build_shared_library(source, flags, deps)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"loading {path} failed: {e}") from e
