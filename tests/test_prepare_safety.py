"""`prepare_data.py` never destroys or reads what is not its own, and fails with a message, not a
traceback: --force on a user's folder, inputs inside --out, planted links, hostile image paths,
FIFOs, decompression bombs, lone surrogates, bad sizes. Running processes (Ctrl-C, killed
workers, two at once): test_prepare_processes.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from file_tree import deadline, picture, png_header, snapshot

from moma_jax.commands.prepare_data import main
from moma_jax.data import outdir, prepare
from moma_jax.data.prepare import _commit

FAST = ["--workers", "1", "--quiet", "--image-size", "8", "--image-codebook", "4"]


def run(capsys, *args: object) -> tuple[int, str]:
    """main(args) with the fast options: (exit status, stderr)."""
    capsys.readouterr()
    rc = main([*FAST, *map(str, args)])
    return rc, capsys.readouterr().err


def jsonl(path: Path, n: int = 40, extra: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"text": f"document {i} " + "words " * 10}) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


# --- Item 1: --force and restarts remove only what a preparation wrote -------------------------


def test_force_on_a_foreign_directory_changes_nothing(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl")
    user = tmp_path / "notes"
    (user / "sub").mkdir(parents=True)
    (user / "todo.txt").write_text("keep me")
    (user / "manifest.json").write_text('{"name": "my web app"}')  # not ours, despite the name
    (user / "sub" / "train-000000-000.array_record").write_text("not a shard of ours")
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        rc, err = run(capsys, "--input", src, "--out", user, *force)
        assert rc == 2 and snapshot(tmp_path) == before
        assert "did not write (manifest.json, sub, todo.txt)" in err
        assert "Choose a new or empty --out" in err and "Traceback" not in err


def test_force_refuses_a_dataset_the_user_added_files_to(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl")
    out = tmp_path / "data"
    assert run(capsys, "--input", src, "--out", out)[0] == 0
    (out / "my_notes.md").write_text("results")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "--input", src, "--out", out, "--force", "--seed", "1")
    assert rc == 2 and "(my_notes.md)" in err and snapshot(tmp_path) == before


def test_force_and_restart_replace_only_our_files(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl")
    out = tmp_path / "data"
    assert run(capsys, "--input", src, "--out", out)[0] == 0
    first = json.loads((out / "manifest.json").read_text())
    assert run(capsys, "--input", src, "--out", out, "--force", "--seed", "1")[0] == 0
    second = json.loads((out / "manifest.json").read_text())
    assert (first["seed"], second["seed"]) == (0, 1) and src.is_file()
    assert outdir.foreign_files(out) == []


@pytest.mark.parametrize("layout", ["folder is out", "file in out", "out in folder", "tokenizer"])
def test_inputs_inside_out_are_refused_untouched(tmp_path, capsys, layout):
    corpus = tmp_path / "corpus"
    src = jsonl(corpus / "docs.jsonl")
    picture(corpus / "pics" / "a.png")
    (corpus / "pics" / "a.txt").write_text("a caption")
    tokenizer = corpus / "tokenizer.json"
    tokenizer.write_text("{}")
    args = {
        "folder is out": ["--input", corpus / "pics", "--out", corpus / "pics"],
        "file in out": ["--input", src, "--out", corpus],
        "out in folder": ["--input", corpus / "pics", "--out", corpus / "pics" / "prepared"],
        "tokenizer": ["--input", tmp_path / "other.jsonl", "--out", corpus],
    }[layout]
    jsonl(tmp_path / "other.jsonl")
    if layout == "tokenizer":
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(tokenizer))
        args += ["--text-tokenizer", tokenizer]
    before = snapshot(tmp_path)
    rc, err = run(capsys, *args, "--force")
    assert rc == 2 and snapshot(tmp_path) == before, err
    assert "Choose an --out outside your inputs" in err


def test_the_bundled_prepare_replaces_only_a_dataset_of_ours(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"\(thesis.tex\); refusing to overwrite"):
        prepare(out, force=True)
    assert snapshot(tmp_path) == before
    new = tmp_path / "new"
    new.mkdir()
    (new / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="thesis.tex"):
        _commit(new, out, force=True)
    assert snapshot(tmp_path) == before


# --- Reruns: an identical one does nothing; a stopped one resumes -------------------------------


def test_an_identical_rerun_is_a_no_op(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl")
    out = tmp_path / "data"
    assert run(capsys, "--input", src, "--out", out)[0] == 0
    before = snapshot(tmp_path, exclude=(out / outdir.LOCK,))  # the lock names its holder
    rc, err = run(capsys, "--input", src, "--out", out)
    assert rc == 0 and snapshot(tmp_path, exclude=(out / outdir.LOCK,)) == before, err


# --- Planted links: a fixed name in --out that points elsewhere --------------------------------


@pytest.mark.parametrize("name", ["prepare_state.json", "manifest.json", outdir.LOCK, "chunks"])
@pytest.mark.parametrize("prepared", [False, True])
def test_a_planted_link_never_reaches_its_target(tmp_path, capsys, name, prepared):
    src = jsonl(tmp_path / "docs.jsonl")
    out = tmp_path / "data"
    out.mkdir()
    if prepared:
        assert run(capsys, "--input", src, "--out", out)[0] == 0
        (out / "manifest.json").unlink()  # unfinished: the rerun would write
        if (out / name).is_dir():
            for p in (out / name).iterdir():
                p.unlink()
            (out / name).rmdir()
        (out / name).unlink(missing_ok=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / name).symlink_to(victim)
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        rc, err = run(capsys, "--input", src, "--out", out, *force)
        assert rc == 2 and "did not write" in err and name in err, err
        assert snapshot(tmp_path) == before


def test_writes_replace_a_planted_link_not_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "state.json").symlink_to(victim)
    outdir.write_json(tmp_path / "state.json", {"a": 1})  # as if planted after the checks
    assert victim.read_text() == "precious" and not (tmp_path / "state.json").is_symlink()
    (tmp_path / outdir.LOCK).symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"), outdir.locked(tmp_path):
        pass
    assert victim.read_text() == "precious"


def test_an_out_that_is_a_link_to_a_directory_is_fine(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert run(capsys, "--input", src, "--out", tmp_path / "link")[0] == 0
    assert (tmp_path / "real" / "manifest.json").is_file()


# --- Hostile records: bad records, skipped and counted with --skip-bad -------------------------


def _outside_corpus(root: Path) -> tuple[Path, Path]:
    """A JSONL naming images by `..`, by an absolute path and through a link, all outside its
    folder; and an image folder holding a link to an image outside it."""
    outside = picture(root / "elsewhere" / "secret.png")
    corpus = root / "corpus"
    picture(corpus / "fine.png")
    (corpus / "link.png").symlink_to(outside)
    lines = [
        {"items": [{"text": "fine"}, {"image": "fine.png"}]},
        {"items": [{"text": "dotdot"}, {"image": "../elsewhere/secret.png"}]},
        {"items": [{"text": "absolute"}, {"image": str(outside)}]},
        {"items": [{"text": "linked"}, {"image": "link.png"}]},
    ]
    src = jsonl(corpus / "docs.jsonl", extra=tuple(json.dumps(x) for x in lines))
    folder = root / "folder"
    for i in range(8):
        picture(folder / f"a{i}.png", seed=i)
        (folder / f"a{i}.txt").write_text(f"caption {i}")
    (folder / "b.png").symlink_to(outside)
    (folder / "b.txt").write_text("b caption")
    return src, folder


@pytest.mark.parametrize("which", ["jsonl", "folder"])
def test_image_paths_outside_the_folder_are_refused_unless_allowed(tmp_path, capsys, which):
    src, folder = _outside_corpus(tmp_path)
    inp = src if which == "jsonl" else folder
    args = ["--input", inp, "--heldout-fraction", "0.3"]
    rc, err = run(capsys, *args, "--out", tmp_path / "a")
    assert rc == 2 and "secret.png, outside" in err and "--allow-outside-paths" in err
    rc, err = run(capsys, *args, "--out", tmp_path / "b", "--skip-bad")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert rc == 0 and manifest["bad_records"]["count"] == (3 if which == "jsonl" else 1)
    rc, err = run(capsys, *args, "--out", tmp_path / "c", "--allow-outside-paths")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert rc == 0 and manifest["bad_records"]["count"] == 0, err


def test_fifos_and_directories_are_bad_records_never_opened(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    os.makedirs(corpus / "dir.png")
    os.mkfifo(corpus / "fifo.png")
    picture(corpus / "ok.png")
    lines = [{"items": [{"text": "x"}, {"image": name}]} for name in ("fifo.png", "dir.png", "")]
    src = jsonl(corpus / "docs.jsonl", extra=tuple(json.dumps(x) for x in lines))
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "f.png")
    (folder / "f.txt").write_text("caption")
    picture(folder / "g.png")
    os.mkfifo(folder / "g.txt")
    picture(folder / "h.png")
    (folder / "h.txt").write_text("caption")
    with deadline(30):
        rc, err = run(capsys, "--input", src, "--out", tmp_path / "a")
        assert rc == 2 and "fifo.png is a FIFO, not a regular file" in err
        args = ["--input", src, folder, "--out", tmp_path / "b", "--skip-bad"]
        rc, err = run(capsys, *args, "--heldout-fraction", "0.3")
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        assert rc == 0 and manifest["bad_records"]["count"] == 5, manifest["bad_records"]
        bad = manifest["bad_records"]["first"]
        assert any("dir.png is a directory, not a regular file" in b for b in bad), bad
        rc, err = run(capsys, "--input", folder / "f.png", "--out", tmp_path / "c")
        assert rc == 2 and "is a FIFO, not a file or folder" in err


def test_decompression_bombs_are_bad_records(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    png_header(corpus / "bomb.png", 6000, 6000, rows=6000)  # 36M pixels, from 35 kB
    png_header(corpus / "huge.png", 100_000, 100_000)  # past PIL's own limit
    picture(corpus / "ok.png")
    lines = [{"items": [{"text": "x"}, {"image": n}]} for n in ("bomb.png", "huge.png", "ok.png")]
    src = jsonl(corpus / "docs.jsonl", extra=tuple(json.dumps(x) for x in lines))
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "a")
    assert rc == 2 and "bomb.png is 6000x6000 = 36,000,000 pixels, over the 16,777,216" in err
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "b", "--skip-bad")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert rc == 0 and manifest["bad_records"]["count"] == 2 and manifest["documents"] == 41
    assert "decompression bomb" in manifest["bad_records"]["first"][1]


def test_lone_surrogates_are_bad_records(tmp_path, capsys):
    src = jsonl(tmp_path / "docs.jsonl", extra=('{"text": "bad \\ud800 text"}',))
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "a")
    assert rc == 2 and f"{src}:41: item 0: a lone surrogate '\\ud800' at character 4" in err
    assert "Traceback" not in err
    assert run(capsys, "--input", src, "--out", tmp_path / "b", "--skip-bad")[0] == 0


def test_a_record_over_the_memory_budget_is_a_bad_record(tmp_path, capsys):
    huge = json.dumps({"text": "x" * 200_000})
    src = jsonl(tmp_path / "docs.jsonl", extra=(huge,))
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "a", "--max-memory", "1MB")
    assert rc == 2 and f"{src}:41: the line is 200013 bytes, over the 62500 bytes" in err
    assert "raise --max-memory" in err
    args = ["--input", src, "--out", tmp_path / "b", "--max-memory", "1MB", "--skip-bad"]
    assert run(capsys, *args)[0] == 0


# --- Refused before anything is written ---------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "0"], "--image-size 0: must be a positive number"),
        (["--image-size", "-8"], "--image-size -8: must be a positive number"),
        (["--patch-size", "0"], "--patch-size 0: must be a positive number"),
        (["--image-codebook", "0"], "--image-codebook 0: must be a positive number"),
        (["--shard-size", "0"], "--shard-size 0: must be a positive number"),
        (["--max-doc-bytes", "-1"], "--max-doc-bytes -1: must be a positive number"),
        (["--workers", "0"], "--workers 0: at least 1"),
        (["--image-codes", "0:4x4"], "sizes must be positive"),
        (["--image-codes", "64:0x4"], "sizes must be positive"),
        (["--text-tokenizer", "bpe:10"], "SIZE must exceed the 256 byte symbols"),
        (["--seed", "-1"], "--seed -1: must be in [0, 2**63)"),
    ],
)
def test_bad_sizes_are_refused_with_the_flag_named(tmp_path, capsys, args, message):
    src = jsonl(tmp_path / "docs.jsonl")
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "out", *args)
    assert rc == 2 and message in err and not (tmp_path / "out").exists(), err


@pytest.mark.parametrize("name", ["tokenizer.json", "my.model"])
def test_a_tokenizer_file_that_is_not_one_is_refused(tmp_path, capsys, name):
    src = jsonl(tmp_path / "docs.jsonl")
    (tmp_path / name).write_text("just some text\n")
    args = ["--out", tmp_path / "out", "--text-tokenizer", tmp_path / name]
    rc, err = run(capsys, "--input", src, *args)
    assert rc == 2 and f"{tmp_path / name}" in err and not (tmp_path / "out").exists(), err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["out", "out/under"])
def test_an_out_that_is_a_file_is_refused(tmp_path, capsys, where):
    src = jsonl(tmp_path / "docs.jsonl")
    (tmp_path / "out").write_text("a file")
    before = snapshot(tmp_path)
    rc, err = run(capsys, "--input", src, "--out", tmp_path / where)
    assert rc == 2 and "is a file, not a directory" in err and snapshot(tmp_path) == before
