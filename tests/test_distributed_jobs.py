"""Harvest and dictionary training under torchrun, through the `mechscope` command as a user types it.

- `torchrun --standalone --nproc_per_node 2 --no-python mechscope harvest ...` writes the store one process
  writes, shard for shard (the manifest too, its creation time aside), with a shard count that does not
  split evenly over the processes; so do two torchrun launches acting as two nodes (below);
- a harvest whose rank 1 is killed mid-round leaves a manifest that names only whole shards, and the same
  command run again finishes the same store;
- two torchrun launches on this machine (`--nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`, one process
  each) act as two nodes and train what one process trains (test_train_dict's two-process config);
- 2 processes train from a store (`--store`) what one process trains from it.

CPU processes on gloo, on the tiny random-weight Llama with a real tokenizer (`conftest.tiny_lm`), saved to
a folder so the command can load it. Every process runs one thread, like the one-process references here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE, STDOUT

import launch
import pytest
import torch
from conftest import tiny_lm
from safetensors.torch import load_file

import mechscope
from mechscope.activations import HarvestSettings, StreamSpec, harvest
from mechscope.dictionaries import load_dictionary, train_dictionary
from mechscope.runtime import Ranks

SITE = "blocks.1.hook_resid_post"
BIN = Path(sys.executable).parent  # the venv's torchrun and mechscope commands
SHARDS = 5  # over 2 processes: the last round has one shard
HARVEST = ["--ctx-len", "32", "--shard-contexts", "4", "--tokens", str(SHARDS * 4 * 28), "--corpus", "builtin"]
TRAIN = dict(sites=[SITE], expansion=4, k=4, tokens=64 * 12, batch_size=64, chunk_contexts=16, ctx_len=32,
             eval_every=10, eval_tokens=256, corpus="builtin", dead_tokens=640, warmup_steps=5)  # fmt: skip
"""test_train_dict's two-process config, as options of train-dict (below) and as a TrainConfig."""

KILL_RANK_1 = """
import os, signal, sys
import mechscope.activations.store as store
from mechscope.cli import main

real, written = store._write_shard, []

def write_then_die(model, source, out, number, *args):
    real(model, source, out, number, *args)
    written.append(number)
    if os.environ["RANK"] == "1" and len(written) == 2:  # its shard of round 1 in place, the round not listed
        os.kill(os.getpid(), signal.SIGKILL)

store._write_shard = write_then_die
sys.argv = ["mechscope", *sys.argv[1:]]
main()
"""


def train_options(**overrides) -> list[str]:
    args = []
    for name, value in {**TRAIN, **overrides}.items():
        for v in value if isinstance(value, list) else [value]:
            args += [f"--{name.replace('_', '-')}", str(v)]
    return [*args, "--no-png"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nodes: int = 1) -> tuple[int, str]:
    """(worst exit code, output) of two processes running `mechscope ARGS` (`python SCRIPT ARGS` when ARGS start
    with a .py file) under torchrun: both on one node (`--standalone`: a free port of its own), or one on each
    of two "nodes", two torchrun launches started together that meet at 127.0.0.1."""
    program = [str(a) for a in args] if str(args[0]).endswith(".py") else ["--no-python", str(BIN / "mechscope"), *args]
    if nodes == 1:
        launches = [launch.one_node(2)]
    else:
        port = free_port()
        launches = [launch.node(2, rank, 1, "127.0.0.1", port) for rank in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    procs = [
        subprocess.Popen([str(BIN / "torchrun"), *where, *program], env=env, stdout=PIPE, stderr=STDOUT, text=True)
        for where in launches
    ]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    return max(proc.returncode for proc in procs), "".join(outs)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_lm().hf.save_pretrained(folder)
    tiny_lm().tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process_store(model_folder, tmp_path_factory) -> Path:
    """The store one process harvests, here, on one thread like the torchrun processes."""
    out = tmp_path_factory.mktemp("one") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = StreamSpec((SITE,), "builtin", ctx_len=32)
        harvest(mechscope.load(str(model_folder)), spec, out, HarvestSettings(SHARDS * 4 * 28, shard_contexts=4), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_store(store: Path, reference: Path) -> None:
    """The same manifest (its creation time aside) and the same shards, tensor by tensor, bit for bit."""
    manifest, want = (json.loads((s / "manifest.json").read_text()) for s in (store, reference))
    assert {**manifest, "created": ""} == {**want, "created": ""}
    assert manifest["complete"] and len(manifest["shards"]) == SHARDS
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in reference.iterdir())  # nothing left over
    for shard in want["shards"]:
        got, expected = load_file(store / shard["file"]), load_file(reference / shard["file"])
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (shard["file"], name)


@pytest.mark.parametrize("nodes", [1, 2])
def test_two_processes_harvest_the_store_one_process_harvests(model_folder, one_process_store, tmp_path, nodes):
    code, out = torchrun("harvest", SITE, "--out", tmp_path / "store", *HARVEST, "--model", model_folder, nodes=nodes)
    assert code == 0, out[-3000:]
    assert out.count(f"{SHARDS * 112:,} tokens of {SITE}") == 1, out[-3000:]  # rank 0 reports
    assert_same_store(tmp_path / "store", one_process_store)


def test_a_harvest_killed_under_torchrun_resumes_to_the_same_store(model_folder, one_process_store, tmp_path):
    """Rank 1 dies with its shard of the second round in place: the manifest lists only the first round,
    and the same command again drops the unlisted shards and finishes the store."""
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    store = tmp_path / "store"
    code, out = torchrun(script, "harvest", SITE, "--out", store, *HARVEST, "--model", model_folder)
    assert code != 0, out[-3000:]
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in (0, 1)]
    assert (store / "shard-00003.safetensors").is_file()  # whole, but its round was never listed
    code, out = torchrun("harvest", SITE, "--out", store, *HARVEST, "--model", model_folder)
    assert code == 0, out[-3000:]
    assert_same_store(store, one_process_store)


def test_two_nodes_train_what_one_process_trains(model_folder, tmp_path):
    """Two torchrun launches, node ranks 0 and 1 of 2, one process each, started together on this machine."""
    code, out = torchrun("train-dict", "--out", tmp_path / "two", *train_options(), "--model", model_folder, nodes=2)
    assert code == 0, out[-3000:]
    assert out.count("dictionary ") == 1, out[-3000:]  # rank 0 reports
    train_dictionary(mechscope.load(str(model_folder)), train_config(), tmp_path / "one", show_progress=False)
    assert_same_dictionary(tmp_path / "two", tmp_path / "one")


def test_two_processes_train_from_a_store_what_one_process_trains(model_folder, one_process_store, tmp_path):
    options = train_options(tokens=64 * 8, store=one_process_store)
    code, out = torchrun("train-dict", "--out", tmp_path / "two", *options, "--model", model_folder)
    assert code == 0, out[-3000:]
    assert out.count("dictionary ") == 1, out[-3000:]  # rank 0 reports
    cfg = train_config(tokens=64 * 8, store=str(one_process_store))
    train_dictionary(mechscope.load(str(model_folder)), cfg, tmp_path / "one", show_progress=False)
    assert_same_dictionary(tmp_path / "two", tmp_path / "one")


class OtherRank(Ranks):
    """Rank 1 of 2 with barriers that wait for nobody: what rank 1 sees once rank 0 has passed them."""

    def barrier(self) -> None:
        pass


def test_a_rank_refuses_a_store_it_cannot_share_in_one_line(one_process_store, tmp_path):
    """A rank that does not see the store rank 0 opened (a folder local to each node), or is asked for a store
    of other settings, says so in one line."""
    from mechscope.activations import store
    from mechscope.errors import MechscopeError

    progress = ("shards", "tokens", "corpus_hash", "complete", "created")
    want = {k: v for k, v in store.read_manifest(one_process_store).items() if k not in progress}  # the settings
    with pytest.raises(MechscopeError, match="rank 1 does not see the store that rank 0 opened at .*give a folder that every"):
        store._open_shared(tmp_path / "local", want, OtherRank(1, 2))
    with pytest.raises(MechscopeError, match=r"harvested with other settings: dtype 'float32' \(asked 'float16'\)") as err:
        store._open_shared(one_process_store, {**want, "dtype": "float16"}, OtherRank(1, 2))
    assert "\n" not in str(err.value)


def train_config(**overrides):
    from mechscope.dictionaries import TrainConfig

    return TrainConfig(**{**TRAIN, **overrides})


def assert_same_dictionary(folder: Path, reference: Path) -> None:
    got, want = load_dictionary(folder / "dictionary"), load_dictionary(reference / "dictionary")
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # gradients summed in another order
