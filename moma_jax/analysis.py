"""Look at a run in a notebook: its config, metrics history, checkpoints and routing.

    from moma_jax import analysis
    run = analysis.load_run("runs/moma_4t4i_tiny")
    run.history("loss", "eval_loss_image")          # {"step": [...], "loss": [...], ...}
    batch = analysis.heldout_batch(run)
    routes = analysis.route(run, batch)             # {layer: {group: {"taken", "gate"}}}
    analysis.load_by_modality(routes, batch)        # {layer: {group: [E, modalities] counts}}
    analysis.image_positions(routes, batch, run)    # {layer: [E, H, W] share of each position}
    analysis.mod_keep_by_modality(routes, batch)    # {layer: {"text": rate, "image": rate}}
    analysis.aux_agreement(routes, batch)           # {layer: {group: balanced accuracy, ...}}
    analysis.generate(run, "ROMEO.", max_tokens=64) # {"text": ..., "images": [[H, W] pixels]}

Works on any checkpoint of any architecture without model code: the model is rebuilt from the
run's saved config and its parameters restored on one device. Dense layers and MoT have no
router, so they have no entry in `route`'s result.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax.config import ExperimentConfig, MeshConfig
from moma_jax.modality import IMAGE, MODALITY_NAMES
from moma_jax.model import Transformer, aux_router, kinds
from moma_jax.sharding import make_mesh
from moma_jax.train.checkpoint import RunCheckpoints
from moma_jax.train.metrics import read_jsonl
from moma_jax.train.state import abstract_params, init_state, make_optimizer
from moma_jax.train.workdir import Workdir


@dataclasses.dataclass
class Run:
    """A training run's directory, opened read-only: config, metrics records, checkpoint
    steps, verified parameters (`train.checkpoint.RunCheckpoints`). Nothing here writes to it."""

    workdir: Path
    config: ExperimentConfig

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records, read on first use (a torn last line is skipped with a
        warning)."""
        metrics = Workdir(self.workdir).metrics_file
        return read_jsonl(metrics) if metrics.exists() else []

    @property
    def checkpoints(self) -> RunCheckpoints:
        return RunCheckpoints(Workdir(self.workdir).checkpoints)

    @property
    def steps(self) -> list[int]:
        """Committed checkpoint steps."""
        return self.checkpoints.steps

    def history(self, *keys: str) -> dict[str, np.ndarray]:
        """The logged values of `keys` (all keys if none) at the steps that logged them."""
        keys = keys or tuple(sorted({k for r in self.records for k in r} - {"step"}))
        rows = [r for r in self.records if all(k in r for k in keys)]
        out = {"step": np.asarray([r["step"] for r in rows])}
        out.update({k: np.asarray([float(r[k]) for r in rows]) for k in keys})
        return out

    def restore(self, step: int | None = None) -> tuple[int, nnx.State]:
        """(step, parameters) of checkpoint `step`, verified as training verifies a resume (on
        one device); default: the latest intact one (a damaged newer one is reported on
        stderr). CheckpointDamagedError (a ValueError) names a damaged or missing step."""
        cfg = dataclasses.replace(self.config, mesh=MeshConfig(data=1))
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        tx = make_optimizer(cfg.optim, cfg.model.aux_routers)
        _, _, abstract, _ = init_state(cfg, tx, mesh)
        ckpts = self.checkpoints
        if step is not None:
            state = ckpts.restore(step, abstract)
        else:
            step, state, damaged = ckpts.latest_intact(abstract)
            if state is None:
                what = f"every checkpoint is damaged ({damaged})" if damaged else "no checkpoint"
                raise ValueError(f"{self.workdir} has {what}")
        ckpts.check_config(step, self.config)
        return step, state.params

    def params(self, step: int | None = None) -> nnx.State:
        """The parameters of checkpoint `step` (default: the latest intact), on one device."""
        return self.restore(step)[1]

    def model(self, step: int | None = None) -> Transformer:
        """The model with the parameters of checkpoint `step` (default: the latest intact)."""
        graphdef, _ = abstract_params(self.config)
        model = nnx.merge(graphdef, self.params(step))
        assert isinstance(model, Transformer)
        return model


def load_run(workdir: str | Path) -> Run:
    """The run in `workdir`, read-only (ValueError if no run was started there)."""
    path = Path(workdir)
    if not path.is_dir():
        raise ValueError(f"{path} is not a run directory (it does not exist or is a file)")
    config = Workdir(path).read_config()
    if config is None:
        raise ValueError(f"{path} holds no run (no config.json)")
    if config.model.attention == "pallas" and jax.default_backend() != "gpu":
        # The same attention by XLA: a run trained on a GPU's kernel reads anywhere.
        print(
            f"note: {path} trained with model.attention=pallas (a GPU kernel); reading it with "
            "the XLA attention here",
            file=sys.stderr,
        )
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, attention="xla")
        )
    return Run(path, config)


def heldout_batch(run: Run, rows: int | None = None) -> dict[str, np.ndarray]:
    """The first held-out batch of the run's data (rows: default the run's batch size)."""
    cfg = run.config
    batches = data_lib.eval_batches(
        data_lib.ensure_data(cfg.data.path or None),
        seq_len=cfg.data.seq_len,
        batch_size=rows or cfg.data.batch_size,
        num_batches=1,
    )
    return batches[0]


def route(
    run: Run,
    batch: dict[str, np.ndarray],
    step: int | None = None,
    routing: str = "teacher_forced",
) -> dict[int, Any]:
    """Runs `batch` through checkpoint `step` and returns every routed layer's decisions:
    {layer: {group: {"taken": bool [B, L, E], "gate": float [B, L, E]}}} (numpy) for expert
    layers, and {"mod": {"keep": bool [B, L]}} for Mixture-of-Depths layers; with aux routers
    also their predictions ("aux_score", sigmoid, [B, L, E] or [B, L]). `routing`: the
    training routers without noise (rows must form whole routing groups) or "causal"."""
    model = run.model(step)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, seg, pos, modality):
        model = nnx.merge(graphdef, state)
        _, aux = model(tokens, seg, pos, modality, None, True, routing=routing)
        return aux.get("capture", {})

    args = (jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions", "modality"))
    return jax.tree.map(np.asarray, forward(state, *args))


def load_by_modality(routes: dict[int, Any], batch: dict[str, np.ndarray]) -> dict[int, Any]:
    """{layer: {group: int [E, modalities]}}: how many tokens of each modality each expert
    took (padding excluded)."""
    real = batch["segment_ids"] > 0
    out: dict[int, Any] = {}
    for layer, groups in routes.items():
        out[layer] = {}
        for name, r in groups.items():
            if "taken" not in r:  # a Mixture-of-Depths entry
                continue
            counts = np.zeros((r["taken"].shape[-1], len(MODALITY_NAMES)), np.int64)
            for m in range(len(MODALITY_NAMES)):
                mask = real & (batch["modality"] == m)
                counts[:, m] = r["taken"][mask].sum(axis=0)
            out[layer][name] = counts
    return out


def image_positions(
    routes: dict[int, Any], batch: dict[str, np.ndarray], run: Run, group: str = "image"
) -> dict[int, np.ndarray]:
    """{layer: float [E, H, W]}: for each expert of `group`, the share of the batch's images
    whose code at grid position (h, w) it took. The grid comes from the manifest."""
    manifest = data_lib.load_manifest(data_lib.ensure_data(run.config.data.path or None))
    per_image = manifest["image"]["codes_per_image"]
    grid = manifest["image"].get("grid") or [int(round(per_image**0.5))] * 2
    vocab = data_lib.Vocab.from_dict(manifest["vocab"])
    starts = [
        (b, int(t) + 1)
        for b, t in zip(*np.nonzero(batch["tokens"] == vocab.boi), strict=True)
        if int(t) + 1 + per_image <= batch["tokens"].shape[1]
    ]
    out = {}
    for layer, groups in routes.items():
        if group not in groups or not starts:
            continue
        taken = groups[group]["taken"]
        maps = np.stack([taken[b, s : s + per_image].T for b, s in starts])  # [images, E, P]
        out[layer] = maps.mean(axis=0).reshape(taken.shape[-1], *grid)
    return out


def image_share(batch: dict[str, np.ndarray]) -> float:
    """Share of the batch's real tokens that are image tokens."""
    real = batch["segment_ids"] > 0
    return float(np.mean(batch["modality"][real] == IMAGE))


def mod_keep_by_modality(
    routes: dict[int, Any], batch: dict[str, np.ndarray]
) -> dict[int, dict[str, float]]:
    """{layer: {modality: share of its real tokens the Mixture-of-Depths layer kept}}."""
    real = batch["segment_ids"] > 0
    out = {}
    for layer, groups in routes.items():
        if "mod" in groups:
            keep = groups["mod"]["keep"]
            out[layer] = {
                name: float(keep[real & (batch["modality"] == m)].mean())
                for m, name in enumerate(MODALITY_NAMES)
                if (real & (batch["modality"] == m)).any()
            }
    return out


def aux_agreement(
    routes: dict[int, Any], batch: dict[str, np.ndarray]
) -> dict[int, dict[str, dict[str, float]]]:
    """{layer: {group or "mod": {"balanced_accuracy", "precision", "recall"}}}: each aux
    router's decision (score > 0.5) against the training router's, over the tokens that group
    could take (its modality, real) -- from a teacher-forced `route`."""
    real = batch["segment_ids"] > 0
    out: dict[int, dict[str, dict[str, float]]] = {}
    for layer, groups in routes.items():
        for name, r in groups.items():
            if "aux_score" not in r:
                continue
            truth = r["keep"] if name == "mod" else r["taken"]
            mask = real if name == "mod" else real & _group_tokens(r["taken"], name, batch)
            pred, truth = r["aux_score"][mask] > 0.5, truth[mask]
            counts = [float(np.sum(a & b)) for a, b in (
                (pred, truth), (pred, ~truth), (~pred, truth), (~pred, ~truth))]  # fmt: skip
            out.setdefault(layer, {})[name] = {
                k: float(v) for k, v in aux_router.rates(*counts).items()
            }
    return out


def _group_tokens(taken: np.ndarray, name: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[B, L] bool: the tokens a group may take (a modality group: its modality; "all")."""
    if name in MODALITY_NAMES:
        return batch["modality"] == MODALITY_NAMES.index(name)
    return np.ones(taken.shape[:2], bool)


def generate(
    run: Run, prompt: str, max_tokens: int = 64, step: int | None = None, **sampling: Any
) -> dict[str, Any]:
    """Samples causally after `prompt` (`moma_jax.sampling`; sampling: temperature, top_k,
    top_p, seed): {"text": str, "tokens": [...], "images": [pixels [H, W] or [H, W, C]]}."""
    from moma_jax import sampling as sampler

    kinds.require_for_causal(run.config, run.workdir)
    data_dir = data_lib.ensure_data(run.config.data.path or None)
    ids = sampler.encode_prompt(prompt, None, None, data_dir)
    options = sampler.Sampling(**sampling)
    result = sampler.generate(run.model(step), run.config, ids, max_tokens, options)
    text, images = sampler.decode(result, data_dir)
    return {"text": text, "tokens": result["tokens"], "images": images}
