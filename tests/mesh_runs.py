"""Run in a subprocess with 8 simulated CPU devices (tests/test_distributed.py): 3 train steps
of each architecture on one device and on several meshes; prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_runs.py [ARCH,...]

ARCH: any of ARCHS (on MESHES) and KIND_MESHES (the other layer kinds); default ARCHS.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np

from moma_jax import registry
from moma_jax.config import MeshConfig, validate
from moma_jax.data import ensure_data, load_manifest, make_train_iterator
from moma_jax.overrides import apply_overrides
from moma_jax.runtime import enable_compilation_cache, with_data_shares
from moma_jax.sharding import batch_sharding, check_mesh, logical_spec, make_mesh
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import jit_train_step

ARCHS = ("dense", "moe_8x", "moma_4t4i", "mot")
MESHES = {
    "data=8": MeshConfig(data=8),
    "fsdp=8": MeshConfig(data=1, fsdp=8),
    "data=2,expert=4": MeshConfig(data=2, expert=4),
    "data=2,fsdp=2,tensor=2": MeshConfig(data=2, fsdp=2, tensor=2),
}
MIXED_MESH = {"fsdp=2,expert=2,tensor=2": MeshConfig(data=1, fsdp=2, expert=2, tensor=2)}
# The other layer kinds, each on the meshes that shard every axis its parameters
# name. MoH, SwitchHead: heads (tensor), experts (expert), embed (fsdp). Mixture of Tokens: its
# groups of 8 consecutive rows split over batch shards (4 rows each), its experts (expert) and
# their hidden size (fsdp, tensor). Mamba: the mixer's channels (tensor); Mixture-of-Mamba adds
# per-modality projections, MoE-Mamba the expert layers.
KIND_MESHES = {
    "moh": MIXED_MESH,
    "switchhead": MIXED_MESH,
    "mixture_of_tokens": {k: MESHES[k] for k in ("data=2,expert=4", "data=2,fsdp=2,tensor=2")},
    "mamba": MIXED_MESH,
    "mom": MIXED_MESH,
    "moe_mamba": MIXED_MESH,
}
SHAPE = (
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.ffn_multiple_of=64",  # the hidden size divides tensor=2
    "data.seq_len=128",
    "data.batch_size=32",  # 8 batch shards x 512 tokens: one routing group each
    "model.moe.routing_group_tokens=512",
    "optim.warmup_steps=1",
)
STEPS = 3


def config(arch: str, mesh: MeshConfig):
    data_dir = ensure_data(None)
    cfg = apply_overrides(registry.get(f"{arch}_tiny"), SHAPE)
    cfg = validate(with_data_shares(cfg, load_manifest(data_dir)))
    return cfg.__class__(**{**cfg.__dict__, "mesh": mesh})


def run(arch: str, mesh_name: str | None) -> dict:
    mesh_cfg = {**MESHES, **MIXED_MESH}[mesh_name] if mesh_name else MeshConfig(data=1)
    cfg = config(arch, mesh_cfg)
    devices = jax.devices() if mesh_name else jax.devices()[:1]
    mesh = make_mesh(cfg.mesh, devices)
    check_mesh(cfg, dict(mesh.shape))
    tx = make_optimizer(cfg.optim)
    graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
    batch_sh = batch_sharding(mesh)
    step: Any = jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)
    it = make_train_iterator(None, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=0)
    batches = [{k: jax.device_put(v, batch_sh) for k, v in next(it).items()} for _ in range(STEPS)]
    compiled = step.lower(abstract, batches[0]).compile()
    hlo = compiled.as_text()
    state = init_fn()
    losses = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    # Every parameter and optimizer leaf has the sharding the logical table gives it.
    wrong = []
    flat_state = jax.tree_util.tree_leaves_with_path(state)
    flat_expected = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), expected in zip(flat_state, flat_expected, strict=True):
        if not leaf.sharding.is_equivalent_to(expected, leaf.ndim):
            wrong.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {expected.spec}")
    sharded = sum(1 for _, leaf in flat_state if any(s is not None for s in leaf.sharding.spec))
    a2a = [line.strip()[:160] for line in hlo.splitlines() if "all-to-all(" in line]
    return {
        "losses": losses,
        "wrong_shardings": wrong,
        "sharded_leaves": sharded,
        "all_to_all": a2a,
        "expert_spec": str(logical_spec(("expert", "embed", "mlp"), (8, 64, 192), mesh)),
    }


def main() -> None:
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    enable_compilation_cache()  # MOMA_JAX_COMPILE_CACHE, shared with the test session
    known = {**{arch: MESHES for arch in ARCHS}, **KIND_MESHES}
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ARCHS
    table = {arch: known[arch] for arch in names}
    out = {}
    for arch, meshes in table.items():
        out[arch] = {"1": run(arch, None)}
        for name in meshes:
            out[arch][name] = run(arch, name)
            print(f"{arch} {name}: {out[arch][name]['losses']}", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    np.set_printoptions(precision=6)
    main()
