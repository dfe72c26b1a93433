"""Bring your own data: a user corpus prepared by `scripts/prepare_data.py --input`, trained on;
BPE round trips; the same shards for any worker count and after a kill; bad records named by
file and line; bounded memory."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_args import small
from user_corpus import make_codes_corpus, make_corpus, sentence

from moma_jax.commands.cli import main as train_main
from moma_jax.commands.prepare_data import main as prepare_main
from moma_jax.data import content_differences, corpus, document_dataset, text_tokenizers
from moma_jax.data.prepare import load_manifest
from moma_jax.train.metrics import read_jsonl

OPTIONS = ["--image-size", "16", "--image-codebook", "64", "--quiet"]


def shard_hashes(path):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.glob("*.array_record"))
    }


@pytest.fixture(scope="module")
def user_inputs(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(user_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    args = ["--input", *map(str, user_inputs), "--out", str(out), "--workers", "1"]
    assert prepare_main([*args, "--text-tokenizer", "bpe:400", *OPTIONS]) == 0
    return out


def test_prepared_corpus_holds_every_input_kind(prepared):
    manifest = load_manifest(prepared)
    assert manifest["vocab"]["n_text"] == 400 and manifest["vocab"]["n_image_codes"] == 64
    assert manifest["vocab"]["size"] == 400 + 64 + 5
    assert manifest["image"] == {
        "shape": [16, 16],
        "channels": 3,
        "patch_size": 4,
        "codes_per_image": 16,
    }
    assert manifest["text_tokenizer"]["file"] == "tokenizer.json"
    assert (prepared / "tokenizer.json").is_file() and (prepared / "image_tokenizer.npz").is_file()
    # 120 JSONL lines + 40 folder images + 30 CSV rows + the text file's documents.
    assert manifest["documents"] > 190 and manifest["bad_records"]["count"] == 0
    splits = manifest["splits"]
    assert splits["train"]["records"] + splits["heldout"]["records"] == manifest["documents"]
    assert 0.05 < splits["train"]["modality_shares"]["image"] < 0.5
    # Every record reads back valid (the pipeline validates ids and modalities).
    docs = list(document_dataset(str(prepared), "train"))
    assert len(docs) == splits["train"]["records"]
    vocab_boi = manifest["vocab"]["boi"]
    with_image = [d for d in docs if vocab_boi in d.tokens]
    assert with_image and all(np.sum(d.tokens == vocab_boi) == 1 for d in with_image)


def test_trains_on_the_prepared_corpus(prepared, tmp_path):
    workdir = tmp_path / "run"
    extra = small(
        "data.seq_len=64",
        "model.moe.routing_group_tokens=512",
        "run.log_every=1",
        "run.eval_every=3",
        "run.eval_batches=1",
    )
    args = ["--exp", "moma_4t4i_tiny", "--workdir", str(workdir), "--steps", "3", *extra]
    assert train_main([*args, "--set", f"data.path={prepared}"]) == 0
    last = read_jsonl(workdir / "metrics.jsonl")[-1]
    for key in ("loss", "loss_text", "loss_image", "eval_loss_text", "eval_loss_image"):
        assert np.isfinite(last[key]), (key, last)


def test_external_image_codes(tmp_path):
    src = make_codes_corpus(tmp_path / "src", codebook=64, grid=4)
    out = tmp_path / "codes"
    args = ["--input", str(src), "--out", str(out), "--image-codes", "64:4x4", "--quiet"]
    assert prepare_main([*args, "--workers", "1"]) == 0
    manifest = load_manifest(out)
    assert manifest["image_tokenizer"] == {"name": "external", "n_codes": 64, "decodable": False}
    assert manifest["image"]["codes_per_image"] == 16
    # The codes of line 1 come back at the image offset, between BOI and EOI.
    first = json.loads(src.read_text().splitlines()[0])["items"]
    codes = next(item["image_codes"] for item in first if "image_codes" in item)
    docs = {
        d.doc_id: d for split in ("train", "heldout") for d in document_dataset(str(out), split)
    }
    tokens = docs[0].tokens
    start = int(np.flatnonzero(tokens == manifest["vocab"]["boi"])[0]) + 1
    offset = manifest["vocab"]["image_ids"][0]
    assert (tokens[start : start + 16] - offset).tolist() == codes
    # One code edited: every count and option the same, only the records' digest tells the
    # two corpora apart (a run resumed, reused or archived across them is refused).
    lines = src.read_text().splitlines()
    doc = json.loads(lines[0])
    item = next(item for item in doc["items"] if "image_codes" in item)
    item["image_codes"][0] = (item["image_codes"][0] + 1) % 64
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(doc), *lines[1:]]) + "\n")
    out2 = tmp_path / "codes2"
    args2 = ["--input", str(edited), "--out", str(out2), "--image-codes", "64:4x4", "--quiet"]
    assert prepare_main([*args2, "--workers", "1"]) == 0
    assert content_differences(manifest, load_manifest(out2)) == ["records_digest"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "  two  spaces\tand\ttabs\n\nnew lines  ",
        "héllo wörld ß 😀 中文",
        "\x00\x01 control",
        "a" * 3000,
    ],
)
def test_bpe_round_trips_exactly(tmp_path, text):
    rng = np.random.default_rng(0)
    texts = [sentence(rng, 20) for _ in range(200)]
    tok = text_tokenizers.train_bpe(texts, 300, tmp_path / "tokenizer.json")
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids.size == 0 or ids.min() >= 0 and ids.max() < 300)
    assert tok.decode(ids) == text
    reloaded = text_tokenizers.load(tok.manifest(), tmp_path)
    assert reloaded.decode(reloaded.encode(text)) == text


def test_same_shards_for_any_worker_count(user_inputs, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = ["--input", *map(str, user_inputs), "--out", str(out), "--max-memory", "1MB"]
        assert prepare_main([*args, "--workers", str(workers), *OPTIONS]) == 0
        outs.append(out)
    assert len(list(outs[0].glob("*.array_record"))) > 2  # several chunks
    assert shard_hashes(outs[0]) == shard_hashes(outs[1])
    manifests = [load_manifest(o) for o in outs]
    for m in manifests:
        m.pop("prepare_seconds")
    assert manifests[0] == manifests[1]


def _text_corpus(path, megabytes):
    rng = np.random.default_rng(0)
    lines, size = [], 0
    while size < megabytes * 1e6:
        line = json.dumps({"text": " ".join(sentence(rng, 40) for _ in range(5))})
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n")
    return path


def test_killed_preparation_resumes_to_the_same_shards(tmp_path):
    src = _text_corpus(tmp_path / "text.jsonl", 6)
    args = ["--input", str(src), "--max-memory", "1MB", "--workers", "1", "--quiet"]
    straight = tmp_path / "straight"
    assert prepare_main([*args, "--out", str(straight)]) == 0
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from moma_jax.commands.prepare_data import main; sys.exit(main(sys.argv[1:]))",
        *args,
        "--out",
        str(killed),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.time() + 60
    while time.time() < deadline and len(list((killed / "chunks").glob("*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()  # killed before the end
    assert prepare_main([*args, "--out", str(killed)]) == 0
    assert shard_hashes(killed) == shard_hashes(straight)
    assert not list(killed.glob("*.tmp"))


BAD = {
    "not JSON": ('{"text": "a"', "not valid JSON"),
    "empty": ('{"items": []}', "empty document"),
    "url": ('{"items": [{"image": "https://x.org/a.png"}]}', "is a URL"),
    "missing image": ('{"items": [{"image": "nope.png"}]}', "does not exist"),
    "unreadable image": ('{"items": [{"image": "junk.png"}]}', "is unreadable"),
    "codes without option": ('{"items": [{"image_codes": [1, 2]}]}', "need --image-codes"),
    "unknown item": ('{"items": [{"audio": "a.wav"}]}', "unknown item 'audio'"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_record_names_file_and_line(tmp_path, capsys, kind):
    line, problem = BAD[kind]
    (tmp_path / "junk.png").write_bytes(b"not a png")
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n' * 30 + line + "\n" + '{"text": "fine"}\n' * 30)
    args = ["--input", str(src), "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"]
    assert prepare_main(args) == 2
    err = capsys.readouterr().err
    assert f"{src}:31: " in err and problem in err and "--skip-bad" in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert prepare_main([*args, "--skip-bad"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["bad_records"]["count"] == 1 and manifest["documents"] == 60
    assert manifest["bad_records"]["first"][0].startswith(f"{src}:31: ")


def test_invalid_utf8_and_external_code_errors(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert prepare_main(["--input", str(src), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert f"{src}:2: invalid UTF-8 at byte 13" in capsys.readouterr().err
    codes = tmp_path / "codes.jsonl"
    codes.write_text(
        '{"items": [{"image_codes": [1, 2, 3, 99]}]}\n{"items": [{"image_codes": [1, 2, 3]}]}\n'
    )
    args = ["--input", str(codes), "--image-codes", "64:2x2", "--quiet", "--skip-bad"]
    assert prepare_main([*args, "--out", str(tmp_path / "b")]) == 2  # nothing left to split
    err = capsys.readouterr().err
    assert "split is empty" in err
    bad = corpus.Options(inputs=(str(codes),), image_codes="64:2x2", skip_bad=True)
    with pytest.raises(ValueError, match="empty"):
        corpus.prepare_corpus(bad, tmp_path / "c", quiet=True)
    first = json.loads((tmp_path / "c" / "chunks" / "000000.json").read_text())["bad"]
    assert "image code 99 at position 3 is outside the codebook [0, 64)" in first[0]
    assert f"{codes}:2: image_codes has 3 codes" in first[1]


def test_memory_stays_bounded(tmp_path):
    """Peak RSS over the RSS after imports, preparing a ~40 MB corpus with --max-memory 4MB."""
    src = _text_corpus(tmp_path / "big.jsonl", 40)
    probe = (
        "import resource, sys\n"
        "from moma_jax.commands.prepare_data import main\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    args = ["--input", str(src), "--out", str(tmp_path / "out"), "--max-memory", "4MB"]
    out = subprocess.run(
        [sys.executable, "-c", probe, *args, "--workers", "1", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 8, grown_mib  # the corpus is 40 MB; its records ~200 MB
