"""Putting OpenBLAS in front of the reference BLAS that ``mlx[cpu]`` bundles."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffgemma import blas

BUNDLED = Path("/site-packages/mlx_cpu.libs/libblas-0123abcd.so.3.10.0")
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def unused():
    raise AssertionError("looked for OpenBLAS when the answer could not matter")


def decide(env=None, bundled=BUNDLED, global_blas=None, mlx_loaded=False, openblas=lambda: OPENBLAS,
           system="linux"):
    return blas.choose_blas(system, env or {}, bundled, global_blas, mlx_loaded, openblas)


def test_loads_openblas_before_mlx():
    decision = decide()
    assert (decision.action, decision.path, decision.blas) == ("load", OPENBLAS, str(OPENBLAS))


@pytest.mark.parametrize("system, bundled", [("darwin", BUNDLED), ("linux", None)])
def test_nothing_to_do_without_a_bundled_reference_blas(system, bundled):
    decision = decide(system=system, bundled=bundled, openblas=unused)
    assert decision.action == "none" and decision.blas == "MLX's linked BLAS"


@pytest.mark.parametrize("mlx_loaded", [False, True])
def test_a_blas_already_in_the_global_scope_is_left_alone(mlx_loaded):
    """An LD_PRELOAD (OpenBLAS, MKL, or anything else) is what MLX binds to; it was chosen."""
    decision = decide(global_blas="/opt/intel/libmkl_rt.so.2", mlx_loaded=mlx_loaded, openblas=unused)
    assert (decision.action, decision.blas) == ("none", "/opt/intel/libmkl_rt.so.2")


def test_opt_out():
    decision = decide(env={blas.OPT_OUT_ENV: "1"}, openblas=unused)
    assert (decision.action, decision.blas) == ("none", str(BUNDLED))
    assert decide(env={blas.OPT_OUT_ENV: "0"}).action == "load"


@pytest.mark.parametrize("mlx_loaded", [False, True])
def test_without_openblas_says_how_to_install_it(mlx_loaded):
    decision = decide(mlx_loaded=mlx_loaded, openblas=lambda: None)
    assert decision.action == "hint" and "apt-get install libopenblas0-pthread" in decision.message
    assert "\n" not in decision.message


def test_too_late_once_mlx_is_loaded():
    decision = decide(mlx_loaded=True)
    assert decision.action == "hint" and decision.blas == str(BUNDLED)
    assert f"LD_PRELOAD={OPENBLAS}" in decision.message and "\n" not in decision.message


def test_privately_loaded_blas_libraries_are_not_in_the_global_scope():
    import numpy  # noqa: F401  (its OpenBLAS is loaded privately, with prefixed symbols)

    found = blas.global_cblas()
    assert found is None or "scipy_openblas" not in found


def test_find_openblas_falls_back_to_ldconfig(tmp_path):
    library = tmp_path / "libopenblasp-r0.3.26.so"
    library.touch()
    cache = (f"\tlibc.so.6 (libc6,x86-64) => /lib/libc.so.6\n"
             f"\tlibopenblas.so.0 (libc6,x86-64) => {library}\n")
    assert blas.find_openblas(machine="no-such-arch", ldconfig_cache=cache) == library
    assert blas.find_openblas(machine="no-such-arch", ldconfig_cache="") is None


# The real thing, in fresh processes: glibc's LD_DEBUG=bindings says which
# library each of libmlx.so's BLAS symbols was bound to, and in which process.

linux_with_bundled_blas = pytest.mark.skipif(
    sys.platform != "linux" or blas.bundled_reference_blas() is None,
    reason="only mlx[cpu] on Linux bundles the reference BLAS")
needs_openblas = pytest.mark.skipif(blas.find_openblas() is None, reason="OpenBLAS is not installed")
MLXDG = [str(Path(sys.executable).parent / "mlxdg")]  # the console script pip installed


def run_bound(command, **env):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env, "LD_DEBUG": "bindings"})
    assert result.returncode == 0, result.stderr[-2000:]
    bindings = re.findall(r"^\s*(\d+):\s+binding file \S*/libmlx\.so \[0\] to (\S+) \[0\]: normal symbol `cblas_sgemm'",
                          result.stderr, re.MULTILINE)
    said = [line for line in result.stderr.splitlines() if "mlxdg:" in line]
    return result.stdout, bindings, said


@linux_with_bundled_blas
@needs_openblas
def test_mlxdg_runs_on_openblas_in_one_process():
    stdout, bindings, said = run_bound(MLXDG + ["version"])
    # One process bound MLX's sgemm, once, and to OpenBLAS: nothing re-executed.
    assert len(bindings) == 1 and "openblas" in bindings[0][1]
    assert "openblas" in stdout and not said


@linux_with_bundled_blas
def test_opting_out_keeps_the_bundled_blas():
    stdout, bindings, said = run_bound(MLXDG + ["version"], **{blas.OPT_OUT_ENV: "1"})
    assert len(bindings) == 1 and Path(bindings[0][1]).name.startswith("libblas-")
    assert "libblas-" in stdout and not said


@linux_with_bundled_blas
@needs_openblas
def test_importing_mlx_first_gives_one_line_saying_how_to_fix_it():
    _, bindings, said = run_bound([sys.executable, "-c", "import mlx.core; import mlx_diffgemma"])
    assert len(bindings) == 1 and Path(bindings[0][1]).name.startswith("libblas-")
    assert len(said) == 1 and "LD_PRELOAD=" in said[0]


@linux_with_bundled_blas
@needs_openblas
def test_this_test_session_runs_on_openblas():
    assert "openblas" in blas.setup()
