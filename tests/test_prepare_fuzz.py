"""A seeded fuzz test of `prepare_data.py --input`: hundreds of small hostile corpora (broken
JSON, wrong types, odd Unicode, paths that leave the folder, FIFOs, bad images, empty files),
each prepared in-process. For every one: the exit status is 0 or 2 (no exception escapes
`main`), nothing outside --out changes, and a finished dataset's counts add up exactly.

The seed changes every run and is named in every failure; rerun one with
`MOMA_JAX_FUZZ_SEED=SEED pytest tests/test_prepare_fuzz.py`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from file_tree import deadline, png_header, snapshot
from PIL import Image

from moma_jax.commands.prepare_data import main
from moma_jax.data import inputs, outdir

SEED = int(os.environ.get("MOMA_JAX_FUZZ_SEED") or int.from_bytes(os.urandom(4), "little"))
N_CORPORA = 400
# All a run with --skip-bad may stop for: what is left is too little (the corpora are tiny).
TOO_LITTLE = ("split is empty", "fewer than the --image-codebook")
BASE = ["--quiet", "--workers", "1", "--image-size", "8", "--patch-size", "4"]
TEXTS = [
    "plain words",
    "",
    "  ",
    "nul \x00 inside",
    "rtl \u202e reversed \u202c",
    "emoji 😀👍🏽 and 中文",
    "combining e\u0301\u0301\u0301",
    "\ufeffbom first",
    "line\nbreaks\r\nand\ttabs",
    "a" * 3000,
]
RAW_LINES = [  # JSONL lines as bytes: broken JSON, wrong types, hostile Unicode
    b'{"text": "unterminated',
    b"[1, 2",
    b"null",
    b"[]",
    b"123",
    b'"a string"',
    b'{"text": 5}',
    b'{"text": null}',
    b'{"items": "x"}',
    b'{"items": [1]}',
    b'{"items": []}',
    b'{"items": [{"text": 1}]}',
    b'{"items": [{"image": 5}]}',
    b'{"items": [{"text": "a", "image": "b"}]}',
    b'{"items": [{"image_codes": [1, "a"]}]}',
    b'{"items": [{"image_codes": [100000000000000000000000]}]}',
    b'{"items": [{"image_codes": [1, 2, 3, 4]}]}',
    b'{"items": [{"image_codes": [-1, 2, 3, 4]}]}',
    b'{"items": [{"text": "x"}, {"image_codes": [true, 0, 1, 2]}]}',
    b'{"items": [{"audio": "a.wav"}]}',
    b'{"text": "lone \\ud800 surrogate"}',
    b'{"text": "low \\udfff first"}',
    b'{"text": "pair \\ud83d\\ude00 fine"}',
    b'{"text": "nul \\u0000 escaped"}',
    b'{"text": "bad utf-8 \xff\xfe here"}',
    b'\xef\xbb\xbf{"text": "with a BOM"}',
    b'{"text": "crlf"}\r',
    b'{"n": ' + b"1" * 5000 + b', "text": "long int"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"text": 1e999}',
    b"   ",
    b"\x00\x00\x00",
]


def _png(path: Path, rng: random.Random, kind: str) -> None:
    """An image file of one kind: good, tiny, grey, truncated, random bytes, empty, a header
    declaring a huge size, a real (small) decompression bomb."""
    if kind in ("good", "tiny", "grey", "truncated"):
        h, w = {"good": (12, 10), "tiny": (1, 1), "grey": (9, 9), "truncated": (16, 16)}[kind]
        pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), np.uint8)
        im = Image.fromarray(pixels).convert("L" if kind == "grey" else "RGB")
        im.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[: rng.randrange(8, 60)])
    elif kind == "random":
        path.write_bytes(rng.randbytes(rng.randrange(1, 200)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge header":
        png_header(path, rng.choice([100_000, 70_000]), 100_000)
    else:  # "bomb": 5000x5000 from ~30 kB
        png_header(path, 5000, 5000, rows=5000)


IMAGE_KINDS = ["good"] * 4 + ["tiny", "grey", "truncated", "random", "empty", "huge header"]


class Corpus:
    """Files under `root`: `outside/` (what no path may reach), `corpus/` (JSONL, CSV, text and
    the images they name), `folder/` (an image folder); and the records each input holds."""

    def __init__(self, root: Path, rng: random.Random, max_doc_bytes: int):
        self.root, self.rng, self.max_doc_bytes = root, rng, max_doc_bytes
        self.outside = root / "outside"
        self.outside.mkdir(parents=True)
        _png(self.outside / "secret.png", rng, "good")
        (self.outside / "secret.txt").write_text("a secret caption")
        self.dir = root / "corpus"
        (self.dir / "img").mkdir(parents=True)
        self.images = [f"img/{i}.png" for i in range(rng.randrange(0, 4))]
        for name in self.images:
            _png(self.dir / name, rng, rng.choice(IMAGE_KINDS))
        if rng.random() < 0.1:
            self.images.append("img/bomb.png")
            _png(self.dir / "img/bomb.png", rng, "bomb")
        os.mkfifo(self.dir / "img" / "fifo.png")
        (self.dir / "img" / "link.png").symlink_to(self.outside / "secret.png")
        (self.dir / "img" / "dir.png").mkdir()
        self.inputs: list[Path] = []
        self.records = 0  # records the inputs hold (counted here, not by the code under test)

    def image_path(self) -> str:
        """A path as a JSONL or CSV would give it: fine, or hostile."""
        hostile = [
            "img/fifo.png",
            "img/dir.png",
            "img/link.png",
            "img/missing.png",
            "../outside/secret.png",
            str(self.outside / "secret.png"),
            "/dev/zero",
            "https://example.org/a.png",
            "",
            "x" * 300 + ".png",
            "img/\u202egnp.png",
        ]
        if self.images and self.rng.random() < 0.6:
            return self.rng.choice(self.images)
        return self.rng.choice(hostile)

    def jsonl(self, name: str) -> None:
        lines = []
        for _ in range(self.rng.randrange(0, 16)):
            r = self.rng.random()
            if r < 0.5:
                lines.append(json.dumps({"text": self.rng.choice(TEXTS)}).encode())
            elif r < 0.7:
                items = [{"text": self.rng.choice(TEXTS)}, {"image": self.image_path()}]
                lines.append(json.dumps({"items": items[:: self.rng.choice([1, -1])]}).encode())
            elif r < 0.75:
                codes = [self.rng.randrange(-1, 17) for _ in range(self.rng.choice([4, 4, 3]))]
                lines.append(json.dumps({"items": [{"image_codes": codes}]}).encode())
            else:
                lines.append(self.rng.choice(RAW_LINES))
        self._lines(self.dir / name, lines, header=False)

    def csv(self, name: str) -> None:
        lines = [b"path,caption"] if self.rng.random() < 0.5 else []
        for _ in range(self.rng.randrange(0, 8)):
            r = self.rng.random()
            path = self.image_path().replace("\n", " ")
            if r < 0.6:
                lines.append(f"{path},{self.rng.choice(TEXTS[:3])}".encode())
            else:
                lines.append(
                    self.rng.choice(
                        [
                            b"only-one-column",
                            b"a,b,c",
                            b'"unbalanced,quote',
                            b"img/0.png,nul\x00caption",
                            b"img/0.png,bad \xff utf-8",
                            b",",
                        ]
                    )
                )
        self._lines(self.dir / name, lines, header=bool(lines) and lines[0] == b"path,caption")

    def text(self, name: str) -> None:
        parts = [self.rng.choice(TEXTS).encode() for _ in range(self.rng.randrange(0, 6))]
        if self.rng.random() < 0.2:
            parts.append(b"\xff\xfe invalid utf-8")
        sep = self.rng.choice([b"\n", b"\n\n", b"\r\n\r\n", b""])
        path = self.dir / name
        path.write_bytes(sep.join(parts))
        self.inputs.append(path)
        # How paragraphs join into documents is the code's own rule: its count is taken here.
        self.records += sum(1 for _ in inputs.scan([path], self.max_doc_bytes, 1 << 30))

    def folder(self) -> None:
        folder = self.root / "folder"
        (folder / "sub").mkdir(parents=True)
        for i in range(self.rng.randrange(0, 6)):
            image = (
                folder
                / self.rng.choice(["", "sub/"])
                / f"{i}{self.rng.choice(['.png', '.PNG', '.jpg'])}"
            )
            _png(image, self.rng, self.rng.choice(IMAGE_KINDS))
            caption = self.rng.choice(["text", "text", "text", "none", "fifo", "dir", "bad"])
            target = image.with_suffix(".txt")
            if caption == "text":
                target.write_text(self.rng.choice(TEXTS))
            elif caption == "fifo":
                os.mkfifo(target)
            elif caption == "dir":
                target.mkdir()
            elif caption == "bad":
                target.write_bytes(b"\xff caption")
        hostile = ["fifo", "link out", "dangling", "dir", "caption out", "not utf-8 name"]
        for kind in self.rng.sample(hostile, self.rng.randrange(0, 3)):
            path = folder / f"h-{kind.replace(' ', '-')}.png"
            if kind == "not utf-8 name":  # a name that is not UTF-8 (os.fsdecode: surrogates)
                path = folder / os.fsdecode(b"caf\xe9.png")
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "link out":
                path.symlink_to(self.outside / "secret.png")
            elif kind == "dangling":
                path.symlink_to(folder / "nowhere.png")
            elif kind == "dir":
                path.mkdir()
            elif kind == "caption out":
                _png(path, self.rng, "good")
                path.with_suffix(".txt").symlink_to(self.outside / "secret.txt")
            else:
                _png(path, self.rng, "good")
                path.with_suffix(".txt").write_bytes(b"caption \xe9")
        self.inputs.append(folder)
        self.records += sum(
            1
            for _, dirs, files in os.walk(folder)
            for name in dirs + files
            if Path(name).suffix.lower() in inputs.IMAGE_SUFFIXES
        )

    def _lines(self, path: Path, lines: list[bytes], header: bool) -> None:
        path.write_bytes(b"\n".join(lines) + self.rng.choice([b"\n", b""]))
        self.inputs.append(path)
        self.records += sum(1 for line in lines if line.strip()) - header


def make_corpus(root: Path, rng: random.Random) -> tuple[Corpus, list[str]]:
    """A corpus of 1-3 inputs and the options to prepare it with."""
    max_doc_bytes = rng.choice([16, 64, 4096, 4096, 4096])
    args = [*BASE, "--max-doc-bytes", str(max_doc_bytes)]
    args += ["--image-codebook", str(rng.choice([4, 4, 8]))]
    args += ["--heldout-fraction", str(rng.choice([0.3, 0.5]))]
    args += ["--image-channels", str(rng.choice([1, 3]))]
    if rng.random() < 0.8:
        args.append("--skip-bad")
    if rng.random() < 0.15:
        args.append("--allow-outside-paths")
    if rng.random() < 0.15:
        args += ["--image-codes", "16:2x2"]
    if rng.random() < 0.15:
        args += ["--text-tokenizer", "bpe:300"]
    if rng.random() < 0.2:
        args += ["--max-memory", "1MB", "--shard-size", str(rng.choice([64, 4096]))]
    corpus = Corpus(root, rng, max_doc_bytes)
    makers = [
        lambda i: corpus.jsonl(f"docs{i}.jsonl"),
        lambda i: corpus.csv(f"rows{i}.csv"),
        lambda i: corpus.text(f"book{i}.txt"),
        lambda i: corpus.folder(),
    ]
    for i in rng.sample(range(4), rng.randrange(1, 4)):
        makers[i](i)
    return corpus, args


def check_manifest(out: Path, corpus: Corpus, where: str) -> None:
    """The counts of a finished dataset add up exactly: records per shard (read back), per
    split, documents, bad records; and only our files are in `out`."""
    manifest = json.loads((out / "manifest.json").read_text())
    records = 0
    for split in ("train", "heldout"):
        info = manifest["splits"][split]
        assert len(info["shards"]) == len(info["shard_records"]) > 0, where
        for name, n in zip(info["shards"], info["shard_records"], strict=True):
            reader = ArrayRecordReader(str(out / name))
            assert reader.num_records() == n, (where, name)
            reader.close()
        assert sum(info["shard_records"]) == info["records"], where
        assert sum(info["modality_tokens"].values()) == info["tokens"], where
        records += info["records"]
    bad = manifest["bad_records"]
    assert records == manifest["documents"], where
    assert manifest["documents"] + bad["count"] == corpus.records, f"{where}\n{manifest}"
    assert len(bad["first"]) == min(bad["count"], 20), where
    assert all(any(b.startswith(str(p)) for p in corpus.inputs) for b in bad["first"]), where
    assert outdir.foreign_files(out) == [], where
    assert not [p for p in out.rglob("*") if outdir.is_temp(p.name)], where


def test_prepare_survives_hostile_corpora(tmp_path, capsys):
    rng = random.Random(SEED)
    outcomes = {0: 0, 2: 0}
    for i in range(N_CORPORA):
        root = tmp_path / f"c{i}"
        corpus, args = make_corpus(root, rng)
        out = root / "out"
        argv = ["--input", *map(str, corpus.inputs), "--out", str(out), *args]
        where = f"MOMA_JAX_FUZZ_SEED={SEED}, corpus {i}: prepare_data.py {' '.join(argv)}"
        before = snapshot(root, exclude=(out,))
        capsys.readouterr()
        with deadline(60):
            try:
                rc = main(argv)
            except BaseException as e:
                raise AssertionError(f"{where}\nraised {type(e).__name__}: {e}") from e
        err = capsys.readouterr().err
        assert rc in (0, 2), f"{where}\nexit {rc}\n{err}"
        assert "Traceback" not in err and (rc == 0 or err.startswith("error: ")), f"{where}\n{err}"
        assert snapshot(root, exclude=(out,)) == before, where
        if rc == 0:
            check_manifest(out, corpus, where)
            manifest = (out / "manifest.json").read_bytes()
            assert main(argv) == 0 and (out / "manifest.json").read_bytes() == manifest, where
        else:
            assert not (out / "manifest.json").exists(), where
            too_little = any(m in err for m in TOO_LITTLE)
            assert too_little or "--skip-bad" not in args, f"{where}\n{err}"
        outcomes[rc] += 1
    print(f"MOMA_JAX_FUZZ_SEED={SEED}: {outcomes[0]} prepared, {outcomes[2]} refused")
    assert outcomes[0] > N_CORPORA // 5  # the corpora are not all refused
