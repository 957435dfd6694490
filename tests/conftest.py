from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kdforge.data.synthetic import write_synthetic

SYNTH = {"train": 1000, "test": 300, "seed": 0}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the official CIFAR-100 format, generated once per test session."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, **SYNTH)
    return root


@pytest.fixture
def make_recipe(tmp_path, synth_root):
    """Write a recipe on the small synthetic dataset with tiny models; `body` adds or replaces sections."""

    def make(body: str = "", name: str = "tiny", data: bool = True) -> Path:
        data_section = (
            f'[data]\ndataset = "synthetic"\nroot = "{synth_root}"\n'
            f"synthetic = {{ train = {SYNTH['train']}, test = {SYNTH['test']}, seed = {SYNTH['seed']} }}\n"
            if data else ""
        )
        path = tmp_path / f"{name}.toml"
        path.write_text(data_section + textwrap.dedent(body))
        return path

    return make


TINY_MODELS = """
[runtime]
device = "cpu"
threads = 2

[train]
epochs = 1
batch_size = 50
lr = 3e-3
log_every = 5

[teacher]
model = "test_resnet"
input_size = 32

[student]
model = "test_convnext"
input_size = 32
"""
