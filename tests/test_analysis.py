"""moma_jax.analysis on a tiny checkpoint of every architecture: load_run, history, params,
route (checked against properties of each routing), load by modality, image positions."""

import numpy as np
import pytest
from cli_args import small

from moma_jax import analysis
from moma_jax.commands.cli import main
from moma_jax.modality import IMAGE, TEXT

KEYS = small("model.moe.routing_group_tokens=1024", "run.log_every=1", "run.eval_every=100")


ARCHS = ["dense", "moe_8x", "moma_1t1i", "moma_4t4i", "mot", "mod_moma_4t4i"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny_run(request, tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp(request.param)
    args = ["--exp", f"{request.param}_tiny", "--workdir", str(workdir), "--steps", "2", *KEYS]
    assert main(args) == 0
    return request.param, analysis.load_run(workdir)


def test_load_run_and_route(tiny_run):
    arch, run = tiny_run
    assert run.config.name == f"{arch}_tiny" and run.steps == [2]
    history = run.history("loss", "loss_image")
    assert history["step"].tolist() == [1, 2] and np.all(np.isfinite(history["loss"]))
    batch = analysis.heldout_batch(run)
    routes = analysis.route(run, batch)
    real = batch["segment_ids"] > 0
    if arch in ("dense", "mot"):
        assert routes == {}  # no router, nothing to capture
        return
    assert sorted(routes) == list(range(run.config.model.n_layers))
    for layer, groups in routes.items():
        if "mod" in groups:  # Mixture-of-Depths: the top quarter of each routing group's tokens
            keep = groups.pop("mod")["keep"]
            assert not keep[~real].any() and keep.sum() == int(keep.size * 0.25)
            for r in groups.values():  # the wrapped layer's experts only see kept tokens
                assert not r["taken"][~keep].any()
            rates = analysis.mod_keep_by_modality({layer: {"mod": {"keep": keep}}}, batch)
            assert set(rates[layer]) == {"text", "image"}
        for name, r in groups.items():
            taken = r["taken"]
            assert not taken[~real].any()  # padding is never routed
            assert np.all(r["gate"][~taken] == 0) and np.all(r["gate"][taken] > 0)
            if name in ("text", "image"):  # a modality group takes only its modality
                other = TEXT if name == "image" else IMAGE
                assert not taken[batch["modality"] == other].any()
            if arch == "moma_1t1i":  # untying: every token of the modality, gate 1
                mine = real & (batch["modality"] == (IMAGE if name == "image" else TEXT))
                assert taken[mine].all() and np.allclose(r["gate"][mine], 1.0)
            else:  # expert choice: every expert takes the same number of tokens
                per_expert = taken.reshape(-1, taken.shape[-1]).sum(axis=0)
                assert len(set(per_expert.tolist())) == 1
    loads = analysis.load_by_modality(routes, batch)
    assert set(loads) == set(routes)
    if arch == "moma_4t4i":
        maps = analysis.image_positions(routes, batch, run)
        assert all(m.shape == (4, 7, 7) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
