"""compare.py --archive, checked on the suite test_compare.py trained (kept apart so that the
suite's fixtures are built once): the archive's contents, the report from it alone, archived runs
not trained again, and the refusals."""

import json
import shutil

import pytest

import moma_jax.train
from moma_jax.commands.compare import main
from moma_jax.config import ConfigError
from moma_jax.suites import SUITES, Suite
from moma_jax.train import archive as archive_lib


def check_archive(tmp_path, rep, monkeypatch, capsys):
    """--archive: the finished suite archived (config, metrics, held-out score; no
    checkpoints), then reported from the archive alone exactly as from its runs; an archived run
    is not trained again, and one archived with another config or without its aux stage stops
    the suite with the key named."""
    root, archive = tmp_path, tmp_path / "archive"
    assert main(["--suite", "test_pair", "--root", str(root), "--archive", str(archive)]) == 0
    stored = archive / "test_pair"
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        [*rep["experiments"], "moe_8x_aux_tiny"]
    )
    dense = stored / "dense_tiny" / "seed0"
    assert sorted(p.name for p in dense.iterdir()) == [
        "archived.json", "config.json", "metrics.jsonl.gz", "score.json.gz"
    ]  # fmt: skip
    assert not (stored / "moe_8x_aux_tiny" / "seed0" / "score.json.gz").exists()
    provenance = json.loads((dense / "archived.json").read_text())
    assert provenance["step"] == 20 and provenance["source"] == str(
        root / "test_pair" / "dense_tiny" / "seed0"
    )
    run = root / "test_pair" / "dense_tiny" / "seed0"
    assert not archive_lib.archive_run(run, dense)  # the same run again: nothing to do
    with pytest.raises(ConfigError, match="already holds another run"):
        archive_lib.archive_run(run, stored / "moe_8x_tiny" / "seed0")

    monkeypatch.setattr(moma_jax.train, "train", _no_training)
    elsewhere = tmp_path / "elsewhere"
    args = ["--suite", "test_pair", "--root", str(elsewhere), "--archive", str(archive)]
    for extra in ([], ["--report-only"]):  # nothing trained: every run read from the archive
        assert main([*args, *extra]) == 0
        again = json.loads((elsewhere / "test_pair" / "report.json").read_text())
        assert sorted(again.pop("archived")) == [f"{e}/seed0" for e in sorted(rep["experiments"])]
        assert again == {k: v for k, v in rep.items() if k != "archived"}
    assert "Read from the archive" in (elsewhere / "test_pair" / "report.md").read_text()
    assert not any(elsewhere.glob("test_pair/*/seed0"))
    # --status: every run and stage, where it stands, nothing trained or written.
    capsys.readouterr()
    assert main([*args, "--seeds", "2", "--status"]) == 0
    out = capsys.readouterr().out
    assert "| test_pair | 0 | moe_8x_aux_tiny | 20 | archived |" in out
    assert "| test_pair | 1 | dense_tiny | 20 | to train |" in out
    assert "5 of 10 runs archived, copied, finished or not needed; 5 left to train." in out
    here = ["--suite", "test_pair", "--root", str(root), "--archive", str(archive), "--status"]
    assert main(here) == 0
    assert "| test_pair | 0 | dense_tiny | 20 | finished, archived |" in capsys.readouterr().out
    # --experiment: that experiment only, in status and in training (here its seed 1 is the
    # first run trained: dense_tiny seed 1 is skipped), with its aux stage.
    assert main([*args, "--seeds", "2", "--experiment", "moe_8x_tiny", "--status"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| test_pair |")]
    assert [r.split(" | ")[1:3] for r in rows] == [
        [s, n] for s in "01" for n in ("moe_8x_tiny", "moe_8x_aux_tiny")
    ]
    monkeypatch.setattr(moma_jax.train, "train", _first_trained)
    with pytest.raises(_TrainedError, match=r"moe_8x_tiny .*seed1"):
        main([*args, "--seeds", "2", "--seed", "1", "--experiment", "moe_8x_tiny"])
    monkeypatch.setattr(moma_jax.train, "train", _no_training)
    assert main([*args, "--experiment", "dense"]) == 2
    assert "--experiment dense: not in suite test_pair (dense_tiny, " in capsys.readouterr().err
    # --seed: that seed only (here archived: nothing trained), reported once all are there.
    (elsewhere / "test_pair" / "report.json").unlink()
    capsys.readouterr()
    assert main([*args, "--seeds", "2", "--seed", "0"]) == 0
    assert "not reported until every seed is there" in capsys.readouterr().err
    assert not (elsewhere / "test_pair" / "report.json").exists()
    assert main([*args, "--seed", "0"]) == 0
    assert (elsewhere / "test_pair" / "report.json").exists()
    assert main([*args, "--seed", "1"]) == 2
    assert "--seed 1: the suite runs seeds 0..0" in capsys.readouterr().err
    # Another suite with some of the same runs: copied within the archive, nothing trained.
    SUITES["test_also"] = Suite(
        "test_also",
        ("dense_tiny", "moe_8x_tiny"),
        1,
        SUITES["test_pair"].overrides,
        aux_stages=True,
    )
    try:
        also = ["--suite", "test_also", "--root", str(tmp_path / "also"), "--archive", str(archive)]
        capsys.readouterr()
        assert main([*also, "--status"]) == 0  # what training will copy, before it does
        listed = capsys.readouterr().out
        assert "| test_also | 0 | moe_8x_aux_tiny | 20 | copied from test_pair |" in listed
        assert "3 of 3 runs archived, copied, finished or not needed; 0 left" in listed
        assert main(also) == 0
        for run in ("dense_tiny", "moe_8x_tiny", "moe_8x_aux_tiny"):
            record = json.loads(
                (archive / "test_also" / run / "seed0" / "archived.json").read_text()
            )
            assert record["copied_from"] == str((stored / run / "seed0").resolve())
        again = json.loads((tmp_path / "also" / "test_also" / "report.json").read_text())
        mine = again["experiments"]["moe_8x_tiny"]["image"]["eta_heldout"]
        assert mine == rep["experiments"]["moe_8x_tiny"]["image"]["eta_heldout"]
    finally:
        SUITES.pop("test_also")
    # Seeds that are not seeds of the same thing are not pooled: a second seed (here seed 0's
    # archive with its seed keys changed) trained with another config, or on other data.
    for exp in rep["experiments"]:
        shutil.copytree(stored / exp / "seed0", stored / exp / "seed1")
    report_two = [*args, "--seeds", "2", "--report-only"]
    assert main(report_two) == 0
    config = stored / "moe_8x_tiny" / "seed1" / "config.json"
    saved = config.read_text()
    cfg = json.loads(saved)
    cfg["optim"]["peak_lr"] *= 2
    config.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(report_two) == 2
    assert "moe_8x_tiny/seed1 was trained with another config" in capsys.readouterr().err
    assert main([*args, "--seeds", "2", "--status"]) == 0  # marked, and not counted as done
    seed1 = {r.split(" | ")[2]: r for r in capsys.readouterr().out.splitlines() if "| 1 |" in r}
    assert "archived, differs: " in seed1["moe_8x_tiny"] and "optim.peak_lr" in seed1["moe_8x_tiny"]
    assert "optim.peak_lr" not in seed1["dense_tiny"]  # (its seed keys are seed 0's: differs)
    assert seed1["moe_8x_aux_tiny"].endswith("| missing |")  # not copied above
    config.write_text(saved)
    provenance = stored / "moe_8x_tiny" / "seed1" / "archived.json"
    record = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**record, "manifest": {**record["manifest"], "seed": 9}}))
    assert main(report_two) == 2
    assert "trained on other data" in capsys.readouterr().err
    # The records' digest, compared where both manifests hold one: dense seed 0's without one
    # (data prepared before it existed) does not let two runs with different ones be pooled.
    paths = [stored / e / f"seed{s}" / "archived.json" for e, s in DIGEST_CASE]
    kept = [p.read_text() for p in paths]
    manifest = json.loads(kept[0])["manifest"]
    without = {k: v for k, v in manifest.items() if k != "records_digest"}
    for path, digest in zip(paths, (None, "a", "b"), strict=True):
        changed = without if digest is None else {**without, "records_digest": {"train": digest}}
        path.write_text(json.dumps({**json.loads(path.read_text()), "manifest": changed}))
    capsys.readouterr()
    assert main(report_two) == 2
    assert "differ in records_digest" in capsys.readouterr().err
    for path, text in zip(paths, kept, strict=True):
        path.write_text(text)
    provenance.write_text(json.dumps(record))
    assert main([*args, "--archive", str(elsewhere)]) == 2  # --archive is --root
    assert "give the archive its own folder" in capsys.readouterr().err
    assert main([*args, "--set", "optim.peak_lr=0.002"]) == 2
    assert "-> 0.002" in capsys.readouterr().err  # optim.peak_lr, named
    shutil.rmtree(stored / "moe_8x_aux_tiny")
    assert main(args) == 2
    assert "but not its aux stage" in capsys.readouterr().err


# dense seed 0 (the report's reference for the data) without a digest, two runs with others
DIGEST_CASE = (("dense_tiny", 0), ("moe_8x_tiny", 0), ("moe_8x_tiny", 1))


class _TrainedError(Exception):
    """Raised by `_first_trained` instead of training: names the first run a command trains."""


def _first_trained(cfg, workdir, *a):
    raise _TrainedError(f"{cfg.name} {workdir}")


def _no_training(cfg, workdir, *a):
    raise AssertionError(f"{cfg.name} was trained; the archive holds it")
