"""Give MLX's Linux CPU backend a real BLAS.

The ``mlx[cpu]`` wheels for Linux vendor the reference (netlib) BLAS beside
``libmlx.so``; its unblocked, single-threaded sgemm is about 20x slower than
OpenBLAS. ``libmlx.so`` takes ``cblas_sgemm`` from whichever library the
dynamic linker finds first, and a library loaded with ``RTLD_GLOBAL`` comes
before a module's own dependencies, so loading an installed OpenBLAS that way
*before* MLX is loaded has the effect of ``LD_PRELOAD`` without restarting
the process. Python loads extension modules with ``RTLD_NOW``, so the symbols
are bound when ``mlx.core`` is imported: after that it is too late, and all
that is left is to say how to get it right.

``mlx_diffgemma/__init__.py`` calls :func:`setup` before anything imports
MLX, so both ``import mlx_diffgemma`` and ``mlxdg`` get OpenBLAS.
"""

import ctypes
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

OPT_OUT_ENV = "MLXDG_NO_BLAS_PRELOAD"
INSTALL_HINT = (
    "mlxdg: MLX is running on its bundled reference BLAS (about 20x slower than OpenBLAS); "
    "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; Fedora: dnf install "
    f"openblas) or set {OPT_OUT_ENV}=1 to silence this"
)


@dataclass(frozen=True)
class Decision:
    """``action`` is ``"load"`` (the library at ``path``), ``"hint"`` (print
    ``message``) or ``"none"``; ``blas`` is what MLX runs on."""

    action: str
    blas: str
    path: Optional[Path] = None
    message: str = ""


def choose_blas(
    system: str,
    env: Mapping[str, str],
    bundled_blas: Optional[Path],
    global_blas: Optional[str],
    mlx_loaded: bool,
    find_openblas: Callable[[], Optional[Path]],
) -> Decision:
    """What :func:`setup` does, from the facts it gathers (tests pass fakes).

    ``global_blas`` is the library that already serves ``cblas_sgemm`` in the
    process's global symbol scope (an ``LD_PRELOAD``, say), which is what MLX
    binds to first; ``find_openblas`` is only called when its answer matters.
    """
    if system != "linux" or bundled_blas is None:
        return Decision("none", "MLX's linked BLAS")
    if global_blas is not None:
        return Decision("none", global_blas)
    if env.get(OPT_OUT_ENV, "") not in ("", "0"):
        return Decision("none", str(bundled_blas))
    openblas = find_openblas()
    if openblas is None:
        return Decision("hint", str(bundled_blas), message=INSTALL_HINT)
    if mlx_loaded:
        return Decision("hint", str(bundled_blas), message=(
            "mlxdg: MLX was imported before mlx_diffgemma, so it runs on its bundled reference "
            f"BLAS (about 20x slower); import mlx_diffgemma first, or run with LD_PRELOAD={openblas}"
        ))
    return Decision("load", str(openblas), path=openblas)


def bundled_reference_blas() -> Optional[Path]:
    """The reference BLAS an ``mlx[cpu]`` wheel vendors, found without loading MLX.

    auditwheel keeps a wheel's vendored libraries in ``<dist>.libs`` beside its
    packages, renamed ``libblas-<hash>.so.*``; a vendored OpenBLAS would be
    ``libopenblas-*`` and is not matched.
    """
    spec = importlib.util.find_spec("mlx")
    locations = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for location in locations:
        for libs in sorted(Path(location).parent.glob("mlx*.libs")):
            found = sorted(libs.glob("libblas-*.so*"))
            if found:
                return found[0]
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas() -> Optional[str]:
    """The file that serves ``cblas_sgemm`` in the global symbol scope, if any.

    Libraries loaded privately (numpy's prefixed OpenBLAS, MLX's own reference
    BLAS) are not in that scope and do not count: only what MLX would bind to
    before its own dependencies does.
    """
    scope = ctypes.CDLL(None)  # dlopen(NULL): the global scope
    try:
        symbol = scope.cblas_sgemm
    except AttributeError:
        return None
    info = _DlInfo()
    if not scope.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return "an unknown library"
    return os.fsdecode(info.dli_fname)


def find_openblas(machine: Optional[str] = None, ldconfig_cache: Optional[str] = None) -> Optional[Path]:
    """An installed OpenBLAS: the distributions' usual paths (Debian's pthread
    build first), then whatever ``ldconfig -p`` lists."""
    machine = machine or platform.machine()
    for candidate in (
        f"/usr/lib/{machine}-linux-gnu/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{machine}-linux-gnu/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{machine}-linux-gnu/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
    ):
        if Path(candidate).is_file():
            return Path(candidate)
    if ldconfig_cache is None:
        ldconfig_cache = _ldconfig_cache()
    for line in ldconfig_cache.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith("libopenblas") and Path(target).is_file():
            return Path(target)
    return None


def _ldconfig_cache() -> str:
    # ldconfig lives in /sbin, which is often not on a user's PATH.
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if ldconfig is None:
        return ""
    try:
        return subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


_blas: Optional[str] = None


def setup() -> str:
    """Put OpenBLAS in front of MLX's bundled reference BLAS while that can
    still be done, or say in one line on stderr what to do. Returns the BLAS
    MLX runs on; does its work once per process."""
    global _blas
    if _blas is None:
        bundled = bundled_reference_blas() if sys.platform == "linux" else None
        decision = choose_blas(sys.platform, os.environ, bundled, global_cblas() if bundled else None,
                               "mlx.core" in sys.modules, find_openblas)
        if decision.action == "load":
            try:
                ctypes.CDLL(str(decision.path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
            except OSError as e:
                decision = Decision("hint", str(bundled),
                                    message=f"mlxdg: cannot load {decision.path}: {e}")
        if decision.action == "hint":
            print(decision.message, file=sys.stderr)
        _blas = decision.blas
    return _blas
