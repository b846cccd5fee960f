"""`--device` of the long jobs (index build, harvest, train-dict) and the device each process computes on.

- `runtime.process_device`: auto is cpu without CUDA and cuda:LOCAL_RANK with it (checked here with CUDA
  faked); a device the machine lacks is one line naming the value and what is valid;
- each command refuses such a device in one line, exit 2, before the model loads, and loads the model with
  `mechscope.load(..., device=...)` on the device asked;
- `Ranks.from_environment` joins gloo without CUDA, and with CUDA one group of gloo for CPU tensors and NCCL
  for CUDA ones, with the process's GPU made current (torch.distributed faked: no group is made here);
- train-dict trains on the device, saves it in the config, and treats a run saved before the field
  existed (or on another device) as the same run;
- with CUDA only: the three jobs on the GPU, and two processes under torchrun on two GPUs.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke_cli, tiny_lm
from test_distributed_jobs import HARVEST, SITE, TRAIN, torchrun, train_options

import mechscope
from mechscope import cli_dict, cli_index, runtime
from mechscope.errors import MechscopeError
from mechscope.runtime import process_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_lm()
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def loads(monkeypatch) -> list:
    """The `device` of every `mechscope.load` call the commands make."""
    seen, real = [], mechscope.load

    def load(spec=None, **kwargs):
        seen.append(kwargs.get("device"))
        return real(spec, **kwargs)

    monkeypatch.setattr(mechscope, "load", load)
    return seen


def fake_cuda(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def commands(tmp_path) -> dict[str, list[str]]:
    return {
        "index build": ["index", "build", "--tokens", "60", "--ctx-len", "30", "--out", str(tmp_path / "i.duckdb")],
        "harvest": ["harvest", SITE, "--out", str(tmp_path / "store"), *HARVEST],
        "train-dict": ["train-dict", "--out", str(tmp_path / "run"), *train_options()],
    }


# -- which device --------------------------------------------------------------------------------


@no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert process_device("auto") == process_device("cpu") == torch.device("cpu")


def test_auto_and_cuda_are_this_process_gpu_with_cuda(monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device("auto") == process_device("cuda") == torch.device("cuda", 1)
    assert process_device("cuda:0") == torch.device("cuda", 0) and process_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")  # one process, not under torchrun
    assert process_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("gpus", "local_rank", "choice", "message"),
    [
        (0, "0", "cuda:0", "--device 'cuda:0' is not available: this machine has no CUDA device; valid here: auto, cpu"),
        (0, "0", "cuda", "--device 'cuda' is not available: this machine has no CUDA device; valid here: auto, cpu"),
        (2, "0", "cuda:2", "--device 'cuda:2' is not available: this machine has 2 CUDA devices, cuda:0..cuda:1; valid"),
        (2, "2", "auto", "--device auto gives each process its own GPU, cuda:LOCAL_RANK, but LOCAL_RANK is 2 and this"),
        (2, "0", "gpu", "--device 'gpu' is not a device: valid values are auto, cpu, cuda, cuda:N"),
    ],
)
def test_a_device_the_machine_lacks_is_one_line(monkeypatch, gpus, local_rank, choice, message):
    fake_cuda(monkeypatch, gpus)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(MechscopeError) as err:
        process_device(choice, "--device")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("cuda", [False, True])
def test_ranks_join_gloo_and_with_cuda_nccl_for_cuda_tensors(monkeypatch, cuda):
    joined, current = [], []
    fake_cuda(monkeypatch, 2 if cuda else 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", joined.append)
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(runtime.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.Ranks.from_environment() == runtime.Ranks(1, 2)
    assert joined == (["cpu:gloo,cuda:nccl"] if cuda else ["gloo"])
    assert current == ([1] if cuda else [])


# -- the commands ----------------------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("command", ["index build", "harvest", "train-dict"])
@pytest.mark.parametrize("device", ["cuda:0", "cuda"])
def test_commands_refuse_a_missing_device_in_one_line_before_loading(monkeypatch, capsys, tmp_path, command, device):
    for module in (cli_index, cli_dict):
        monkeypatch.setattr(module, "_load", lambda *_: pytest.fail("the model was loaded before --device was checked"))
    code, out, err = invoke_cli(monkeypatch, capsys, *commands(tmp_path)[command], "--device", device)
    assert code == 2 and out == "", err
    assert err.strip() == f"error: --device {device!r} is not available: this machine has no CUDA device; valid here: auto, cpu"
    assert not any(tmp_path.iterdir())  # nothing written


@no_cuda
@pytest.mark.parametrize("command", ["index build", "harvest", "train-dict"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_commands_load_the_model_on_the_device(monkeypatch, capsys, tmp_path, model_folder, loads, command, device):
    """auto (the default: None) and cpu both load on the CPU here; each job runs to the end."""
    argv = [*commands(tmp_path)[command], "--model", str(model_folder), *(["--device", device] if device else [])]
    if command == "index build":
        argv += ["--sites", SITE]
    code, _, err = invoke_cli(monkeypatch, capsys, *argv, consoles=(cli_dict,))
    assert code == 0, err
    assert loads == [torch.device("cpu")]
    if command == "train-dict":
        saved = json.loads((tmp_path / "run" / "dictionary" / "cfg.json").read_text())["training"]["config"]
        assert saved["device"] == (device or "auto")


def test_train_dict_finds_its_finished_run_saved_on_another_device_or_before_the_field(
    monkeypatch, capsys, tmp_path, model_folder
):
    out = tmp_path / "run"
    argv = ["train-dict", "--out", str(out), *train_options(tokens=64 * 4), "--model", str(model_folder)]
    code, _, err = invoke_cli(monkeypatch, capsys, *argv, "--device", "cpu", consoles=(cli_dict,))
    assert code == 0, err
    cfg = out / "dictionary" / "cfg.json"
    saved = json.loads(cfg.read_text())
    del saved["training"]["config"]["device"]  # as a run saved before there was a device
    cfg.write_text(json.dumps(saved))
    before = (out / "dictionary" / "dictionary.safetensors").read_bytes()
    code, _, err = invoke_cli(monkeypatch, capsys, *argv, "--device", "auto", consoles=(cli_dict,))
    assert code == 0, err
    assert "other settings" not in err and (out / "dictionary" / "dictionary.safetensors").read_bytes() == before


def test_train_config_keeps_the_cpu_by_default():
    """The Python API trains where it always did; the command's --device defaults to auto."""
    from mechscope.dictionaries import TrainConfig

    assert TrainConfig().device == "cpu"


# -- on a GPU ------------------------------------------------------------------------------------


@cuda_only
def test_the_jobs_run_on_the_gpu(monkeypatch, capsys, tmp_path, model_folder, loads):
    from mechscope.dictionaries import TrainConfig, train_dictionary

    assert process_device("auto") == torch.device("cuda", 0)
    for name, argv in commands(tmp_path).items():
        argv = [*argv, "--model", str(model_folder), "--device", "cuda"]
        argv += ["--sites", SITE] if name == "index build" else []
        code, _, err = invoke_cli(monkeypatch, capsys, *argv, consoles=(cli_dict,))
        assert code == 0, f"{name}: {err}"
    assert loads == [torch.device("cuda", 0)] * 3
    model = mechscope.load(str(model_folder), device="cuda")
    d = train_dictionary(model, TrainConfig(**TRAIN, device="cuda"), tmp_path / "api", show_progress=False)
    assert d.W_enc.device == torch.device("cuda", 0)
    log = [json.loads(line) for line in (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < log[-1]["eval_fvu"] < 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_processes_train_on_two_gpus(tmp_path, model_folder):
    code, out = torchrun("train-dict", "--out", tmp_path / "two", *train_options(), "--model", model_folder, "--device", "auto")
    assert code == 0, out[-3000:]
    assert out.count("dictionary ") == 1, out[-3000:]
