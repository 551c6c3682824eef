"""The rules' conda environment file builds: valid pip block, post-deploy script, same deps as the package.

conda itself is not on the development or CI machines, so what conda would run is tested piece by
piece: the pip block as pip reads it, and the post-deploy script against this virtual environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
ENV_FILES = sorted(ENVS.glob("*.yaml"))
POST_DEPLOY = ENVS / "ccfm.post-deploy.sh"
# conda-forge names of packages whose PyPI names differ
CONDA_TO_PYPI = {"pytorch": "torch"}
# the environment only runs rules: the scheduler and its executor plugin are the user's
NOT_IN_RULE_ENV = {"snakemake", "snakemake-executor-plugin-slurm"}


def _environment(env_file: Path = ENVS / "ccfm.yaml") -> tuple[list[str], list[str]]:
    spec = yaml.safe_load(env_file.read_text())
    conda = [dep for dep in spec["dependencies"] if isinstance(dep, str)]
    pip = next(dep["pip"] for dep in spec["dependencies"] if isinstance(dep, dict))
    return conda, pip


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].strip().lower()


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_pip_block_holds_only_requirement_specifiers(env_file: Path) -> None:
    _, pip = _environment(env_file)
    for line in pip:
        assert not line.startswith("-"), f"pip rejects options in an environment file's pip block: {line!r}"
        Requirement(line)  # raises on anything pip would not read as a requirement


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_environment_covers_the_package_dependencies(env_file: Path) -> None:
    conda, pip = _environment(env_file)
    provided = {CONDA_TO_PYPI.get(_name(dep), _name(dep)) for dep in conda + pip}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(dep) for dep in project["dependencies"]} - NOT_IN_RULE_ENV
    if env_file.stem == "state":
        needed |= {_name(dep) for dep in project["optional-dependencies"]["state"]}
    assert needed <= provided, f"missing from {env_file.name}: {sorted(needed - provided)}"


def _post_deploy_commands(script: Path) -> str:
    """The script's text with every script it runs from its own directory (`bash "$(dirname "$0")/x.sh"`) inlined."""
    text = script.read_text()
    for name in re.findall(r'bash "\$\(dirname "\$0"\)/([\w.-]+\.sh)"', text):
        called = script.parent / name
        assert called.exists(), f"{script.name} runs {name}, which does not exist"
        text += "\n" + _post_deploy_commands(called)
    return text


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_post_deploy_script_sits_beside_the_environment_file(env_file: Path) -> None:
    # Snakemake runs <env>.post-deploy.sh after creating <env>.yaml's environment: that script
    # (and what it runs) must install scGPT without its pinned dependencies and this package.
    script = env_file.with_suffix(".post-deploy.sh")
    assert script.exists()
    text = _post_deploy_commands(script)
    assert "--no-deps" in text and "scgpt==0.2.4" in text
    assert re.search(r"pip install --no-deps --no-build-isolation -e \"\$repository\"", text), text


@pytest.mark.slow
def test_pip_block_and_post_deploy_script_resolve(tmp_path: Path) -> None:
    _, pip = _environment()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(pip) + "\n")
    pip_cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet"]
    block = subprocess.run([*pip_cmd, "-r", str(requirements)], capture_output=True, text=True, timeout=300)
    assert block.returncode == 0, block.stderr
    # The post-deploy script against this environment, pip in dry-run mode: it finds the repository
    # from its own location and both installs resolve.
    env = {**os.environ, "PIP_DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    deployed = subprocess.run(
        ["bash", str(POST_DEPLOY)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "Would install" in deployed.stdout and "ccfm" in deployed.stdout and "scgpt" in deployed.stdout
