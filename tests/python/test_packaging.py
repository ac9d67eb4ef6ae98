"""The source distribution: what `pip install shardpipe-*.tar.gz` builds from.

The extension compiles every C++/CUDA file under ``csrc/`` and includes its headers, so an
sdist that left one out would fail to build on the user's machine while every test here,
built in place, passes. The baseline is the source tree itself: the files git tracks.
"""

import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# What a build from the sdist needs: the sources, the package, and the build's own files.
NEEDED_PREFIXES = ("csrc/", "python/shardpipe/")
NEEDED_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt")


def tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of the source tree")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return out.split()


def test_the_sdist_holds_every_file_a_build_needs(tmp_path):
    tracked = tracked_files()
    needed = [f for f in tracked if f.startswith(NEEDED_PREFIXES) or f in NEEDED_FILES]
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    # Built from a copy of the tracked files, so nothing left over in this tree (a build
    # folder, an egg-info) can stand in for what the sdist should hold.
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
                   cwd=src, check=True, capture_output=True, timeout=300)
    (archive,) = tmp_path.glob("shardpipe-*.tar.gz")
    with tarfile.open(archive) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in needed if f not in held]
    assert not missing, f"the sdist lacks {missing}"
