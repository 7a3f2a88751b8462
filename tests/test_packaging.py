"""The wheel installs cleanly and its CLI runs outside the source tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("mlx_diffgemma-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "mlx_diffgemma" in top_level
    assert not {"convert", "bench", "tests"} & top_level
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_diffgemma/convert/__init__.py" in names and "mlx_diffgemma/bench/__init__.py" in names

    # Dependencies come from this interpreter's site-packages: the point is our wheel, not PyPI.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, mlxdg = venv / "bin" / "python", venv / "bin" / "mlxdg"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)

    help_text = subprocess.run([str(mlxdg), "--help"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "DiffusionGemma" in help_text.stdout
    where = subprocess.run([str(python), "-c", "import mlx_diffgemma.convert as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert str(venv) in where, where
