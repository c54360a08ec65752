"""base.device: auto falls back to the CPU and says so; cuda without a GPU is a one-line error in every stage."""

import shutil
from pathlib import Path

import pytest
import torch

from models.device import DeviceError, resolve_device

REPO = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


@no_gpu
def test_auto_computes_on_the_cpu_and_says_so(capsys):
    assert resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err.strip() == "base.device: auto: no CUDA device visible, computing on the CPU"
    assert resolve_device("cpu") == torch.device("cpu")


@no_gpu
@pytest.mark.parametrize("stage", ["train", "pretrain", "evaluate"])
def test_cuda_without_a_gpu_is_a_one_line_error(stage, tmp_path, monkeypatch, capsys):
    import importlib

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(f"pipelines.{stage}").main(["-P", "base.device=cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"{stage}: error: base.device: cuda, but torch sees no CUDA device")
    assert "set base.device: auto or cpu" in lines[0]


def test_an_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
