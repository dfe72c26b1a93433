"""The one-call device check (`scripts/device_check.py`): its bundle, and a dry run of its
phases at tiny shapes on the CPU, so the script that spends device time is checked here."""

import json
import shutil
from pathlib import Path

import pytest

from moma_jax.bench import device_check, kernels

REPO = Path(__file__).resolve().parents[1]


def fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "device_check.py", tmp_path / "scripts")
    return tmp_path


def test_prepare_bundles_the_data_and_the_run_script(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("MOMA_JAX_DATA_DIR", str(data_dir))
    root = fake_repo(tmp_path)
    call = device_check.prepare(root, wheels=False)
    bundle = root / device_check.DIR
    assert call["command"] == f"bash {device_check.DIR}/run.sh"
    assert call["carry"] == [device_check.DIR] and call["timeout_s"] <= 600
    assert (bundle / "data" / "manifest.json").read_bytes() == (
        data_dir / "manifest.json"
    ).read_bytes()
    script = (bundle / "run.sh").read_text()
    assert f"--data {device_check.DIR}/data" in script and "--no-index" in script
    assert "PIPESTATUS" in script  # the check's exit status, not tee's
    device_check.prepare(root, wheels=False)  # a second prepare refreshes its own bundle
    assert (bundle / "data" / "manifest.json").is_file()


def test_prepare_refuses_a_directory_it_did_not_write(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("MOMA_JAX_DATA_DIR", str(data_dir))
    root = fake_repo(tmp_path)
    theirs = root / device_check.DIR / "data" / "notes.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("mine")
    with pytest.raises(FileExistsError, match="not written by"):
        device_check.prepare(root, wheels=False)
    assert theirs.read_text() == "mine"
    monkeypatch.chdir(tmp_path / "scripts")  # not the repository root
    assert device_check.main(["prepare", "--no-wheels"]) == 2


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(kernels, "attention_report", broken)
    report = device_check.run_check(tmp_path, "", 600, True, ("env", "attention", "gemm"))
    phases = report["phases"]
    assert phases["attention"]["status"] == "failed"
    assert "RuntimeError: no such kernel" in phases["attention"]["error"]
    assert phases["env"]["status"] == phases["gemm"]["status"] == "ok"
    assert phases["gemm"]["not_run"]["mosaic_ragged_dot"].startswith("needs a Hopper")
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["phases"]["attention"]["status"] == "failed"
    spent = device_check.run_check(tmp_path, "", -1, True, ("env",))
    assert spent["phases"]["env"]["status"] == "skipped"
    assert (
        device_check.main(["run", "--data", "x", "--out", str(tmp_path), "--only", "atention"]) == 2
    )


def test_dry_run_checks_the_kernels_and_times_the_variants(tmp_path, data_dir):
    only = ("attention", "variants", "mamba_scan")
    report = device_check.run_check(tmp_path, str(data_dir), 600, True, only)
    attention, variants = report["phases"]["attention"], report["phases"]["variants"]
    assert attention["status"] == "ok", attention
    assert attention["max_abs_diff_vs_xla"]["pallas"] < 1e-4  # interpreted kernel == XLA
    assert set(attention["ms"]) == {"xla", "pallas"}  # cuDNN candidates only on a GPU
    assert variants["status"] == "ok", variants
    assert set(variants["vs_default"]) == {
        "dense/attention=pallas_interpret",
        "moe_8x/first_fraction=1",
        "moma_4t4i/first_fraction=1",
    }
    assert all(v > 0 for v in variants["ms"].values())
    scan = report["phases"]["mamba_scan"]
    assert scan["status"] == "ok", scan
    assert set(scan["vs_dense"]) == {"mamba/scan=associative", "mamba/scan=sequential"}
    assert all(v > 0 for v in scan["vs_dense"].values())


def test_segment_ids_hold_whole_documents_then_padding():
    seg = kernels.segment_ids(kernels.CPU_ATTENTION)
    for row in seg:
        real = row[row > 0]
        assert list(real) == sorted(real) and set(real) == set(
            range(1, kernels.CPU_ATTENTION.docs + 1)
        )
        assert (row[len(real) :] == 0).all()  # padding only at the end
