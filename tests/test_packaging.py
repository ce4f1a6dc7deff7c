"""Packaging: this distribution installs one top-level package, ``lemoe_engine``.

The Triton kernels install as ``lemoe_engine.kernels``. A top-level ``kernels`` package would
overwrite (or be overwritten by) Hugging Face's ``kernels`` package, which transformers imports
for hub kernels. The checks: the wheel built from this tree holds nothing outside
``lemoe_engine``, the installed distribution (editable or not) maps no top-level ``kernels``,
and ``import kernels`` finds nothing of this project.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _top_level_names(paths) -> set[str]:
    names = set()
    for p in paths:
        first = str(p).replace("\\", "/").split("/")[0]
        if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("", ".."):
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    return names


def test_wheel_holds_only_lemoe_engine(tmp_path):
    """Build the wheel from a copy of the sources (the shared tree gets no build/ folder)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "lemoe_engine", src / "lemoe_engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr and "wheel" in proc.stderr:
        pytest.skip(f"cannot build wheels here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert _top_level_names(names) == {"lemoe_engine"}, sorted(_top_level_names(names))
    assert "lemoe_engine/kernels/__init__.py" in names
    assert "lemoe_engine/kernels/grouped_ffn.py" in names
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheels[0]).read(top_level[0]).decode().split() == ["lemoe_engine"]


def test_installed_distribution_has_no_top_level_kernels():
    dists = [d for d in importlib.metadata.distributions()
             if (d.metadata["Name"] or "").lower().replace("_", "-") == "lemoe-engine"]
    if not dists:
        pytest.skip("lemoe-engine is not installed (pip install -e .)")
    for dist in dists:
        top = dist.read_text("top_level.txt")
        if top is not None:
            assert "kernels" not in top.split(), f"{dist._path}: top_level.txt lists kernels"
        files = list(dist.files or [])
        assert "kernels" not in _top_level_names(files), f"{dist._path} installs a top-level kernels"
        # an editable install maps top-level names to folders in its finder module
        for f in files:
            if f.name.startswith("__editable__") and f.name.endswith("_finder.py"):
                text = Path(f.locate()).read_text()
                assert "'kernels'" not in text and '"kernels"' not in text, f"{f} maps a top-level kernels"


def test_kernels_import_under_the_project_namespace():
    import lemoe_engine.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "lemoe_engine" / "kernels" or \
        Path(kernels.__file__).resolve().parent.parent.name == "lemoe_engine"
    assert callable(kernels.anchor_route) and callable(kernels.grouped_expert_ffn)
    # nothing of this project answers `import kernels`, not even from the repository root
    assert not (ROOT / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        assert ROOT not in Path(spec.origin).resolve().parents, spec.origin
        assert "lemoe_engine" not in spec.origin
