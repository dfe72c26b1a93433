"""Several devices: the same losses on every mesh as on one device for every layer kind, every
parameter and moment sharded as the logical table says, experts' slot buffers moved by
all-to-all, checkpoints resharded onto another mesh, two processes training as one, and
impossible meshes refused before compiling.

The runs happen in subprocesses with 8 (or 4) simulated CPU devices (simulated.py), all in
this one file so that one test worker runs them one after another: two such processes at once
on 2 cores starve each other's device threads (measured: both past 15 minutes).
"""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import simulated
from cli_args import sets
from simulated import ROOT, RTOL, assert_shards_as_one_device, devices_env, run_simulated

from moma_jax import registry
from moma_jax.config import ConfigError, MeshConfig
from moma_jax.sharding import check_mesh, mesh_shape
from moma_jax.train.metrics import read_jsonl


@pytest.fixture(scope="module")
def mesh_runs(data_dir):
    return simulated.mesh_runs("dense", "moe_8x", "moma_4t4i", "mot")


@pytest.mark.parametrize("arch", ["dense", "moe_8x", "moma_4t4i", "mot"])
def test_every_mesh_gives_the_one_device_losses(mesh_runs, arch):
    runs = mesh_runs[arch]
    reference = runs.pop("1")["losses"]
    assert len(runs) == 4
    for mesh, run in runs.items():
        assert run["losses"] == pytest.approx(reference, rel=RTOL), mesh
        assert run["wrong_shardings"] == [], (mesh, run["wrong_shardings"][:3])
        if "fsdp" in mesh or "tensor" in mesh:
            assert run["sharded_leaves"] > 0, mesh  # the parameters really are sharded
    assert runs["data=8"]["sharded_leaves"] == 0  # pure data parallelism replicates them


def test_expert_parallel_step_moves_slot_buffers_by_all_to_all(mesh_runs):
    """moe_8x on (data=2, expert=4): each shard sends [groups, 8/4 experts, slots, d=64]."""
    buffer = re.compile(r"f32\[\d+,2,\d+,64\]")
    expert_parallel = mesh_runs["moe_8x"]["data=2,expert=4"]["all_to_all"]
    assert any(buffer.search(line) for line in expert_parallel), expert_parallel
    assert not any(buffer.search(line) for line in mesh_runs["moe_8x"]["data=8"]["all_to_all"])
    groups = mesh_runs["moma_4t4i"]["data=2,expert=4"]["all_to_all"]
    assert any(re.search(r"f32\[\d+,1,\d+,64\]", line) for line in groups)  # 4 experts / 4


@pytest.fixture(scope="module")
def kind_runs(data_dir):
    """MoH, SwitchHead and Mixture of Tokens on their meshes (`mesh_runs.KIND_MESHES`)."""
    return simulated.mesh_runs("moh", "switchhead", "mixture_of_tokens")


@pytest.mark.parametrize(
    "arch, meshes",
    [
        # MoH and SwitchHead (model/moh.py, model/switchhead.py) on fsdp=2, expert=2, tensor=2.
        ("moh", 1),
        ("switchhead", 1),
        # Mixture of Tokens (model/mixture_of_tokens.py) on data=2,expert=4 and
        # data=2,fsdp=2,tensor=2: each group of 8 rows spans two batch shards of 4 rows, so the
        # one-device losses show the groups are rows of the config, not of a shard.
        ("mixture_of_tokens", 2),
    ],
)
def test_other_kinds_shard_as_their_rows_say_with_the_one_device_losses(kind_runs, arch, meshes):
    assert_shards_as_one_device(kind_runs[arch], meshes)


# Mixture-of-Mamba and MoE-Mamba (model/ssm_kinds.py) on fsdp=2, expert=2, tensor=2: the
# scan's channels over tensor, the per-modality projections and the experts sharded as their
# rows say. Plain Mamba has no run of its own: MoE-Mamba's mixers are plain Mamba mixers (same
# rows, same scan) and its SwiGLU is dense's, and each 8-device run costs ~85 s of CI.
@pytest.fixture(scope="module")
def ssm_runs(data_dir):
    return simulated.mesh_runs("mom", "moe_mamba")


@pytest.mark.parametrize("arch", ["mom", "moe_mamba"])
def test_mamba_kinds_shard_as_their_rows_say_with_the_one_device_losses(ssm_runs, arch):
    assert_shards_as_one_device(ssm_runs[arch], meshes=1)


def _cfg(name: str = "moe_8x_tiny", **model):
    cfg = registry.get(name)
    if model:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    return cfg


def _sizes(**axes: int) -> dict[str, int]:
    return {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **axes}


@pytest.mark.parametrize(
    "cfg, sizes, message",
    [
        (
            _cfg(),
            _sizes(expert=3),
            "has 8 experts (model.moe.group_experts=(8,)), not divisible by mesh.expert=3",
        ),
        (
            _cfg(),
            _sizes(data=3),
            "does not split over the batch shards mesh.data x mesh.fsdp x mesh.expert = 3x1x1 = 3",
        ),
        (_cfg(), _sizes(data=4, expert=2), "would split a routing group"),
        (
            _cfg(moe=dataclasses.replace(_cfg().model.moe, expert_compute="ragged_dot")),
            _sizes(expert=2),
            "model.moe.expert_compute=ragged_dot has no expert-parallel path; with mesh.expert=2 "
            "use expert_compute=slabs",
        ),
        (_cfg("dense_tiny"), _sizes(tensor=3), "model.n_heads=4 is not divisible by mesh.tensor=3"),
        (
            _cfg("dense_tiny", n_heads=6),
            _sizes(tensor=3),
            "model.ffn_hidden (resolved)=341 is not divisible by mesh.tensor=3",
        ),
        (
            _cfg("dense_tiny", d_model=120, n_heads=4),
            _sizes(fsdp=16),
            "model.d_model=120 is not divisible by mesh.fsdp=16",
        ),
        (  # 344 / granularity 4 = 86 per expert: the tensor axis of 4 divides 344, not 86
            _cfg(ffn_hidden=344, moe=dataclasses.replace(_cfg().model.moe, granularity=4)),
            _sizes(tensor=4),
            "an expert's hidden (ffn_hidden / model.moe.granularity)=86 is not divisible by "
            "mesh.tensor=4",
        ),
    ],
)
def test_impossible_meshes_name_the_key_and_numbers(cfg, sizes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_mesh(cfg, sizes)


def test_more_devices_than_exist_is_refused():
    with pytest.raises(
        ConfigError, match=r"mesh.data=4, mesh.expert=4 needs a multiple of 16 devices, but 8"
    ):
        mesh_shape(MeshConfig(data=4, expert=4), 8)


SMALL = sets(
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=128",
    "data.batch_size=32",
    "model.moe.routing_group_tokens=512",
    "optim.total_steps=40",
    "optim.warmup_steps=2",
    "run.log_every=1",
    "run.eval_every=100",
    "run.eval_batches=2",
    "run.checkpoint_every=2",
    "run.async_checkpoint=false",
)


def train(workdir: Path, steps: int, devices: int, *mesh: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--exp", "moe_8x_tiny"]
    cmd += ["--workdir", str(workdir), "--steps", str(steps), *SMALL, *sets(*mesh)]
    run_simulated(cmd, devices)


def test_embedding_lookup_shards_without_replicating_the_activations():
    """model/lookup.py on 5 meshes: NumPy's rows and table gradient, ids outside the vocabulary
    as `jnp.take` (wrapped or NaN), each shard's rows laid out by batch, and no "Involuntary
    full rematerialization" from XLA, which `jnp.take` gets on the mixed mesh (the control,
    after '--- take')."""
    proc = run_simulated([sys.executable, str(ROOT / "tests" / "lookup_runs.py")], 8)
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(runs) == 5
    for mesh, run in runs.items():
        assert run["rows_error"] == 0.0 and run["grad_error"] < 1e-5, (mesh, run)
        assert run["odd_ids_as_take"], mesh
    assert runs["fsdp=2,expert=2,tensor=2"]["rows_spec"] == "P(('fsdp', 'expert'),)"
    ours, take = proc.stderr.split("--- take")
    remat = "Involuntary full rematerialization"
    assert remat not in ours, ours[-2000:]
    assert remat in take, "jnp.take no longer replicates on this mesh: is model/lookup.py needed?"


def test_checkpoint_restores_onto_another_mesh(tmp_path, data_dir):
    """Written on 8 devices (data=2, expert=4), resumed on 4 (data=2, expert=2): the same
    losses as the uninterrupted 8-device run."""
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(straight, 4, 8, "mesh.data=2", "mesh.expert=4")
    train(moved, 2, 8, "mesh.data=2", "mesh.expert=4")
    train(moved, 4, 4, "mesh.data=2", "mesh.expert=2")
    a = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_jsonl(moved / "metrics.jsonl") if "loss" in r}
    assert [b[s] for s in (1, 2, 3, 4)] == pytest.approx([a[s] for s in (1, 2, 3, 4)], rel=RTOL)


def test_aot_fit_check_compiles_for_a_simulated_mesh(capsys, data_dir):
    """describe.py --aot: compiled in a subprocess with the mesh's device count; experts move by
    all-to-all; micro_batches doubles until the estimate fits the given device memory."""
    from moma_jax.commands.describe import main as describe_main

    args = ["--exp", "moe_8x_tiny", "--aot", "--mesh", "data=2,expert=2", "--json"]
    assert (
        describe_main([*args, *sets("data.batch_size=16", "model.moe.routing_group_tokens=512")])
        == 0
    )
    report = json.loads(capsys.readouterr().out)["aot"]
    assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
    assert report["collectives"]["all-to-all"] > 0
    assert report["memory_per_device_bytes"] > report["params_per_device_bytes"] > 0
    assert jax.device_count() == 1  # the simulated devices stayed in the subprocess
    small = report["memory_per_device_bytes"] * 3 // 4
    fitted = ["--device-memory", str(small)]
    assert (
        describe_main(
            [*args, *fitted, *sets("data.batch_size=16", "model.moe.routing_group_tokens=512")]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)["aot"]
    assert [t["micro_batches"] for t in report["trials"]][:2] == [1, 2]
    assert describe_main(["--exp", "moe_8x_tiny", "--aot", "--mesh", "expert=3"]) == 2
    assert "not divisible by mesh.expert=3" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, data_dir):
    """2 processes x 4 devices (gloo collectives, each process reading its own stream of
    documents) give the losses of 1 process x 8 devices; data.streams=2 fixes the batches."""
    mesh = ("mesh.data=2", "mesh.expert=4", "data.streams=2")
    one = tmp_path / "one"
    train(one, 3, 8, *mesh)
    two = tmp_path / "two"
    base = [sys.executable, str(ROOT / "scripts" / "train.py"), "--exp", "moe_8x_tiny"]
    base += ["--workdir", str(two), "--steps", "3", *SMALL, *sets(*mesh)]
    base += ["--coordinator", f"localhost:{_free_port()}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [*base, "--process-id", str(i)],
            env=devices_env(4),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a = [r["loss"] for r in read_jsonl(one / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(two / "metrics.jsonl") if "loss" in r]
    assert len(a) == 3 and b == pytest.approx(a, rel=RTOL)
    assert (two / "checkpoints" / "3").is_dir()  # written by both processes together
