"""A catalogue of bad inputs: each exits non-zero with a message naming the problem, and no
checkpoint, workdir or data file is created or changed."""

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from cli_args import small

from moma_jax.commands.cli import main
from moma_jax.data import records

SMALL = small()
MOMA = ["--exp", "moma_4t4i_tiny", *SMALL, "--set", "model.moe.routing_group_tokens=1024"]


def snapshot(*roots: Path) -> dict:
    """Every file under the roots with its size and modification time."""
    out = {}
    for root in roots:
        if root.exists():
            for p in sorted(root.rglob("*")):
                out[str(p)] = (
                    p.is_dir(),
                    p.stat().st_size if p.is_file() else 0,
                    p.stat().st_mtime_ns,
                )
    return out


def bad_record_dir(tmp: Path, source: Path, payloads: list[bytes]) -> Path:
    """A copy of the bundled dataset whose train split holds only the given raw records."""
    out = tmp / "data"
    out.mkdir()
    manifest = json.loads((source / "manifest.json").read_text())
    for name in manifest["splits"]["heldout"]["shards"]:
        shutil.copy(source / name, out / name)
    for name in ("image_tokenizer.npz",):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    writer = ArrayRecordWriter(str(out / "train-00000-of-00001.array_record"), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    manifest["splits"]["train"]["shards"] = ["train-00000-of-00001.array_record"]
    manifest["splits"]["train"]["shard_records"] = [len(payloads)]
    manifest["splits"]["train"]["records"] = len(payloads)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def good_tokens(n=40):
    return np.r_[768, np.arange(65, 65 + n - 2) % 256, 769].astype(np.int32)  # BOS text EOS


def raw(doc_id, tokens, modality):
    """Record bytes written without the serializer's checks (header: version, id, length)."""
    header = struct.pack("<BII", records.FORMAT_VERSION, doc_id, len(tokens))
    return header + np.asarray(tokens, "<i4").tobytes() + np.asarray(modality, np.int8).tobytes()


def out_of_vocab(_):
    t = good_tokens()
    t[5] = 5000
    return [raw(i, t, np.zeros(len(t), np.int8)) for i in range(64)]


def wrong_modality_length(_):
    t = good_tokens()
    return [raw(i, t, np.zeros(len(t), np.int8))[:-3] for i in range(64)]


def unknown_modality(_):
    t = good_tokens()
    m = np.zeros(len(t), np.int8)
    m[3] = 7
    return [raw(i, t, m) for i in range(64)]


CASES: dict[str, tuple[Any, str]] = {
    "unknown experiment": (["--exp", "dense_tniy"], "unknown experiment 'dense_tniy'"),
    "bad --set key": (["--exp", "dense_tiny", "--set", "model.dmodel=3"], "model.d_model"),
    "bad --set type": (["--exp", "dense_tiny", "--set", "model.d_model=wide"], "type int"),
    "bad --set bool": (["--exp", "dense_tiny", "--set", "model.qk_norm=maybe"], "type bool"),
    "--set without =": (["--exp", "dense_tiny", "--set", "model.d_model"], "key=value"),
    "negative size": (["--exp", "dense_tiny", "--set", "model.d_model=-8"], "must be positive"),
    "zero batch": (["--exp", "dense_tiny", "--set", "data.batch_size=0"], "data.batch_size"),
    "zero layers": (["--exp", "dense_tiny", "--set", "model.n_layers=0"], "model.n_layers"),
    "heads do not divide": (["--exp", "dense_tiny", "--set", "model.n_heads=3"], "divisible"),
    "unknown layer kind": (["--exp", "dense_tiny", "--set", "model.layer_pattern=mlp"], "mlp"),
    "bad dtype": (["--exp", "dense_tiny", "--set", "model.compute_dtype=fp8"], "compute_dtype"),
    "negative lr": (["--exp", "dense_tiny", "--set", "optim.peak_lr=-1"], "peak_lr"),
    "micro-batches": (["--exp", "dense_tiny", "--set", "data.micro_batches=3"], "micro_batches"),
    "capacity 0": ([*MOMA, "--set", "model.moe.capacity=0"], "capacity must be positive"),
    "expert group of 0": ([*MOMA, "--set", "model.moe.group_experts=4,0"], "0 experts"),
    "modality without group": ([*MOMA, "--set", "model.moe.modality_group=0,3"], "no expert group"),
    "routing group < experts": (
        [*MOMA, "--set", "model.moe.routing_group_tokens=2"],
        "smaller than the number of experts",
    ),
    "impossible mesh": (["--exp", "dense_tiny", "--set", "mesh.data=3"], "mesh"),
    "vocab too small": (["--exp", "dense_tiny", "--set", "model.vocab_size=500"], "vocab_size"),
    "sequence shorter than an image": (
        ["--exp", "dense_tiny", "--set", "data.seq_len=32"],
        "seq_len",
    ),
    "zero steps": (["--exp", "dense_tiny", *SMALL, "--steps", "0"], "--steps"),
    "steps past the schedule": (["--exp", "dense_tiny", *SMALL, "--steps", "41"], "--steps"),
    "missing data directory": (
        ["--exp", "dense_tiny", "--set", "data.path={tmp}/nowhere"],
        "nowhere",
    ),
    "empty data directory": (["--exp", "dense_tiny", "--set", "data.path={tmp}/empty"], "empty"),
    "token out of vocabulary": (out_of_vocab, "5000"),
    "modality of wrong length": (wrong_modality_length, "header says 40 tokens"),
    "unknown modality id": (unknown_modality, "modality"),
    "Adam b1 of 1": (["--exp", "dense_tiny", "--set", "optim.b1=1"], "optim.b1 must be in [0, 1)"),
    "NaN eps": (["--exp", "dense_tiny", "--set", "optim.eps=nan"], "optim.eps must be a small"),
    "float16 on CPU": (
        ["--exp", "dense_tiny", "--set", "model.param_dtype=float16"],
        "float16 is not supported on the CPU backend",
    ),
    "a model larger than the memory": (
        ["--exp", "dense_tiny", "--set", "model.d_model=65536", "--set", "model.n_heads=64"],
        "the model does not fit",
    ),
    "init-from a missing run": (
        ["--exp", "upcycled_moma_4t4i_tiny", "--init-from", "{tmp}/no_run"],
        "no run there",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(case, tmp_path, data_dir, capsys):
    argv, message = CASES[case]
    (tmp_path / "empty").mkdir()
    if callable(argv):  # a data directory with bad records
        path = bad_record_dir(tmp_path, data_dir, argv(None))
        argv = ["--exp", "dense_tiny", *SMALL, "--set", f"data.path={path}"]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    workdir = tmp_path / "run"
    before = snapshot(data_dir, tmp_path)
    assert main([*argv, "--workdir", str(workdir)]) != 0
    err = capsys.readouterr().err
    assert message in err, err
    assert not workdir.exists()
    assert snapshot(data_dir, tmp_path) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("finished")
    assert main(["--exp", "dense_tiny", *SMALL, "--steps", "2", "--workdir", str(workdir)]) == 0
    return workdir


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--exp", "moe_8x_tiny"], "holds a run of experiment 'dense_tiny'"),
        (["--exp", "dense_tiny", *SMALL, "--set", "data.seed=3"], "data.seed: 0 -> 3"),
        (["--exp", "dense_tiny", *SMALL, "--set", "model.remat=full"], "model.remat"),
    ],
)
def test_workdir_of_another_run_is_refused_unchanged(finished_run, argv, message, capsys):
    before = snapshot(finished_run)
    assert main([*argv, "--workdir", str(finished_run), "--steps", "4"]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_workdir_at_or_under_a_file_is_refused(where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    workdir = blocker if where == "file" else blocker / "run"
    assert main(["--exp", "dense_tiny", *SMALL, "--workdir", str(workdir)]) == 2
    assert "blocker" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


def test_non_integer_steps_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--exp", "dense_tiny", "--steps", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
