"""Per-layer metric names are built and parsed by one module, and keep the names older runs
logged ("layer_{i}/moe/{group}/load_{e}")."""

from moma_jax.metric_names import layer_metric, split_expert_load, split_layer_metric


def test_layer_metric_names_round_trip_and_keep_the_logged_format():
    key = layer_metric(12, "moe/text/load_3")
    assert key == "layer_12/moe/text/load_3"
    assert split_layer_metric(key) == (12, "moe/text/load_3")
    assert split_expert_load("moe/text/load_3") == ("text", 3)


def test_other_keys_are_not_per_layer_metrics():
    for key in ("loss", "moe/text/load_3", "layer_plan/x", "layer_/x", "layer_3"):
        assert split_layer_metric(key) is None, key
    for name in ("moe/text/score_mean", "mod/keep_frac", "moe/text/load_x", "x/text/load_1"):
        assert split_expert_load(name) is None, name
