"""deploy/slurm/distill.sbatch and deploy/k8s/pytorchjob.yaml launch `kdforge distill` across nodes: the batch script
is valid bash, the PyTorchJob's pod templates are valid Kubernetes PodSpecs (kubernetes-validate, strict), and the
kdforge command lines both hold are accepted by kdforge's own command-line parser (options, types, the recipe)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev install")


def parse_kdforge(argv: list[str]) -> dict:
    """kdforge's own parser on `argv` (after "kdforge"), without running the command: its parameters."""
    from typer.main import get_command

    from kdforge.cli import app

    assert argv[0] == "distill", argv
    command = get_command(app).commands["distill"]
    params = command.make_context("distill", [a.replace("recipes/", f"{ROOT}/recipes/", 1) for a in argv[1:]]).params
    assert Path(params["recipe"]).is_file(), params["recipe"]  # a recipe of the repository
    return params


def test_the_slurm_script_is_valid_bash_and_its_kdforge_line_parses():
    script = ROOT / "deploy" / "slurm" / "distill.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith("kdforge "))
    values = {"RECIPE": "recipes/vit_to_vit.toml", "GPUS": "8", "SLURM_NNODES": "2", "HEAD": "node0", "PORT": "29400",
              "RUNS": "runs"}
    expanded = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], line)
    params = parse_kdforge(shlex.split(expanded)[1:])
    assert params["nproc"] == 8 and params["nnodes"] == 2 and params["rdzv_endpoint"] == "node0:29400"
    assert params["resume"] is True


def test_the_pytorchjob_runs_valid_pods_and_kdforge_commands():
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for name, replica in replicas.items():
        spec = replica["template"]["spec"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name.lower()},
                                      "spec": spec}, "1.30", strict=True)
        (container,) = spec["containers"]
        assert container["name"] == "pytorch"  # the container the training operator configures
        params = parse_kdforge(container["command"][1:])
        assert container["command"][0] == "kdforge" and str(params["runs_dir"]) == "/runs"
        assert any(mount["mountPath"] == "/runs" for mount in container["volumeMounts"])  # one runs folder for all
