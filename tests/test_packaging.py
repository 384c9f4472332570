"""The package builds (sdist, then a wheel from the sdist) and installs and imports in a clean venv.

The clean venv gets only the wheel (``--no-deps``, no index); lorajax's
dependencies are borrowed from the test environment through a ``.pth`` line
placed after the venv's own site-packages, so the import must find lorajax and
pallas_kernels in the installed wheel, not in this source tree.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    return out


def test_wheel_and_sdist_hold_every_package(dist):
    (wheel,) = dist.glob("lorajax-*.whl")
    (sdist,) = dist.glob("lorajax-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("lorajax", "lorajax/variants", "lorajax/optim", "lorajax/models", "lorajax/es", "lorajax/train",
                    "lorajax/inits", "lorajax/data", "pallas_kernels"):
        assert f"{package}/__init__.py" in names, package
    assert "lorajax/variants/lora.py" in names and "pallas_kernels/lora_linear.py" in names
    assert "lorajax/models/csrc/attention_cpu.cc" in names  # the fused attention kernel's source
    assert sdist.stat().st_size > 0


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; the wheel's contents are checked in the quick suite
def test_wheel_installs_and_imports_in_a_clean_venv(dist, tmp_path):
    (wheel,) = dist.glob("lorajax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=120)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies (jax, flax, optax, ...) from this environment, searched after the venv's own packages
    (pathlib.Path(site) / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import jax.numpy as jnp, lorajax, pallas_kernels; "
            "spec = lorajax.Spec('lora', rank=1, targets=['d']); "
            "ad = lorajax.init(spec, {'d': {'kernel': jnp.ones((3, 2))}}, 0); "
            "print(lorajax.__file__); print(pallas_kernels.__file__); print(sorted(ad['d']['kernel']))")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300).stdout.splitlines()
    assert out[0].startswith(site) and out[1].startswith(site), out
    assert out[2] == "['lora_A', 'lora_B']"
