"""The wheel installs cleanly and its CLI runs outside the source tree."""

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        cwd=tmp_path)
    (wheel,) = dist.glob("mlx_diffgemma-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "mlx_diffgemma" in top_level
    assert not {"convert", "bench", "tests"} & top_level
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_diffgemma/convert/__init__.py" in names and "mlx_diffgemma/bench/__init__.py" in names

    # Dependencies come from this interpreter's site-packages (a venv's too, when the tests run in one;
    # a new venv's --system-site-packages would see only the base interpreter's): the point is our
    # wheel, not PyPI. The .pth file appends them after the new venv's own site-packages.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python, mlxdg = venv / "bin" / "python", venv / "bin" / "mlxdg"
    inner = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(inner) / "outer_site_packages.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])

    help_text = run([str(mlxdg), "--help"], cwd=tmp_path)
    assert "DiffusionGemma" in help_text.stdout
    where = run([str(python), "-c", "import mlx_diffgemma.convert as c; print(c.__file__)"], cwd=tmp_path).stdout
    assert str(venv) in where, where


def run(command, cwd=None) -> subprocess.CompletedProcess:
    """Run ``command``; on failure, fail with what it printed (check=True alone hides the child's error)."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done
