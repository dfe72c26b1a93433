"""Held-out loss by task: document pieces classified by hand-built rows."""

import numpy as np

from moma_jax.tasks import TASKS, target_tasks, task_losses

BOS, EOS, T, IM = 90, 91, 1, 50  # a text id and an image id


def test_each_document_kind_scores_its_own_part():
    # One row: [text doc][caption -> image][image -> caption][text, image, text][padding].
    pieces = [
        ([BOS, T, T, EOS], [0, 0, 0, 0]),
        ([BOS, T, IM, IM, EOS], [0, 0, 1, 1, 0]),
        ([BOS, IM, IM, T, T, EOS], [0, 1, 1, 0, 0, 0]),
        ([BOS, T, IM, T, EOS], [0, 0, 1, 0, 0]),
    ]
    tokens, modality, segments = [], [], []
    for s, (tok, mod) in enumerate(pieces, start=1):
        tokens += tok
        modality += mod
        segments += [s] * len(tok)
    tokens += [0, 0]
    modality += [0, 0]
    segments += [0, 0]
    batch = {k: np.asarray([v]) for k, v in
             (("tokens", tokens), ("modality", modality), ("segment_ids", segments))}  # fmt: skip
    tasks = target_tasks(batch, BOS, EOS)[0]
    name = {i: n for i, n in enumerate(TASKS)}
    got = [name.get(int(t), "-") for t in tasks]
    # Target t + 1 is scored at position t; a piece's first token is never a target.
    expected = (
        ["text"] * 3 + ["-"]  # doc 1: T, T, EOS; then the boundary
        + ["-", "text_to_image", "text_to_image", "-", "-"]  # only the two image codes
        + ["-", "-", "image_to_text", "image_to_text", "image_to_text", "-"]  # caption + EOS
        + ["interleaved"] * 4 + ["-", "-"]
    )  # fmt: skip
    assert got == expected[: len(got)]
    ce = np.arange(tasks.size, dtype=np.float64)[None]
    losses = task_losses(ce, tasks[None])
    assert losses["text"] == {"loss": 1.0, "tokens": 3}
    assert losses["text_to_image"]["tokens"] == 2 and losses["interleaved"]["tokens"] == 4
