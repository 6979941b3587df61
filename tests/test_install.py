"""An installed wurst needs no checkout: `pip install .` (not editable) into a folder of its own, then
tools/convert_weights.py, run from a folder outside the checkout with only that install of wurst importable, converts
original-format release files, which takes the published configs the package carries (package data)."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import ROOT
from tests.weights.test_convert import to_release_layout
from wurst.weights.repository import read_repository

# Runs the script given as its first argument as `python script args` would (the script's folder first on the path),
# and at exit writes the files of every wurst module loaded to $WURST_MODULES_FILE.
RUN_NAMING_WURST = """
import atexit, json, os, runpy, sys

def name_wurst_modules():
    files = sorted({m.__file__ for name, m in list(sys.modules.items())
                    if name.partition('.')[0] == 'wurst' and getattr(m, '__file__', None)})
    with open(os.environ['WURST_MODULES_FILE'], 'w') as f:
        json.dump(files, f)

atexit.register(name_wurst_modules)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def pip_install(tmp_path: Path) -> Path:
    """wurst installed from a copy of what `pip install .` builds from (the project file, the readme it names and
    the package), so that the build writes nothing into the checkout (build/, *.egg-info). Offline: no
    dependencies, and the build backend is this environment's setuptools."""
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "wurst", source / "wurst", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
                    str(source)], check=True, capture_output=True, timeout=300)
    return target


def release_files(folder: Path, prior_repo: Path, decoder_repo: Path) -> dict[str, Path]:
    """The tiny fixtures' stages as the authors' .pt release files, by converter flag."""
    files = {}
    for flag, repo, component, key in [("--stage-c", prior_repo, "prior", "ema_state_dict"),
                                       ("--stage-b", decoder_repo, "decoder", "state_dict"),
                                       ("--stage-a", decoder_repo, "vqgan", "state_dict")]:
        state = to_release_layout(load_file(repo / component / "diffusion_pytorch_model.safetensors"))
        files[flag] = folder / f"{component}.pt"
        torch.save({key: state, "iter": 1}, files[flag])
    return files


def test_installed_wurst_converts_release_files_outside_the_checkout(tmp_path, tiny_prior_repo, tiny_decoder_repo):
    target = pip_install(tmp_path)
    installed = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert "wurst/weights/published_configs.json" in installed and "wurst/weights/original.py" in installed

    work = tmp_path / "work"
    work.mkdir()
    assert not work.is_relative_to(ROOT)
    files = release_files(work, tiny_prior_repo, tiny_decoder_repo)
    # -S: no .pth file runs, so the editable install's finder, which would serve any module the install lacks from
    # the checkout, is never loaded; the other packages come through PYTHONPATH, after the install.
    packages = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    path = [str(target), *packages]
    assert not any(Path(p).resolve() == ROOT for p in path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "WURST_MODULES_FILE": str(work / "modules.json"),
           "WURST_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = work / "converted"
    argv = ["--prior", str(tiny_prior_repo), "--decoder", str(tiny_decoder_repo), "--out", "converted",
            *(x for flag, file in files.items() for x in (flag, file.name))]
    result = subprocess.run([sys.executable, "-S", "-c", RUN_NAMING_WURST, ROOT / "tools" / "convert_weights.py",
                             *argv], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [os.path.join("converted", "prior"), os.path.join("converted", "decoder")]

    modules = json.loads((work / "modules.json").read_text())
    assert any(m.endswith(os.path.join("wurst", "weights", "original.py")) for m in modules), modules
    assert all(Path(m).is_relative_to(target) for m in modules), [m for m in modules if ROOT.as_posix() in m]
    # The output loads, and holds the release files' weights.
    hub = {"prior": read_repository(tiny_prior_repo, "prior"), "decoder": read_repository(tiny_decoder_repo, "decoder")}
    for kind, component in [("prior", "prior"), ("decoder", "decoder"), ("decoder", "vqgan")]:
        repo = read_repository(out / kind, kind)
        assert repo.converted and repo.files[component] == [out / kind / repo.files[component][0].name]
        ours = repo.load(component, dtype=None, device="cpu").state_dict()
        theirs = hub[kind].load(component, dtype=None, device="cpu").state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), component
