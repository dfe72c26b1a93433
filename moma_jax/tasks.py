"""Held-out loss by task, as in the MoMa paper's causal evaluation table.

Each document piece in a packed row (one segment) is classified by the order of its modality
runs, BOS/EOS ignored:

    text           text only                          loss on every target (text)
    text_to_image  a caption, then an image           loss on the image's tokens
    image_to_text  an image, then its caption         loss on the caption's tokens (EOS included)
    interleaved    anything else with both modalities loss on every target

An image-only piece (a document cut by the row boundary) counts as interleaved. The bundled
held-out split has the first three kinds; a user's data gets each kind its documents have.
"""

from __future__ import annotations

import numpy as np

from moma_jax.losses import target_mask_np
from moma_jax.modality import IMAGE, TEXT

TASKS = ("interleaved", "text_to_image", "image_to_text", "text")


def _kind(runs: list[int]) -> str:
    if runs == [TEXT]:
        return "text"
    if runs == [TEXT, IMAGE]:
        return "text_to_image"
    if runs == [IMAGE, TEXT]:
        return "image_to_text"
    return "interleaved"


def target_tasks(batch: dict[str, np.ndarray], bos: int, eos: int) -> np.ndarray:
    """int8 [B, L-1]: the task index (into TASKS) whose loss each target counts in, -1 for
    none (padding, a target outside its task's part, or a piece with no real token)."""
    tokens, segments, modality = (
        np.asarray(batch[k]) for k in ("tokens", "segment_ids", "modality")
    )
    rows, length = tokens.shape
    out = np.full((rows, length - 1), -1, np.int8)
    valid = target_mask_np(segments)
    for r in range(rows):
        for s in np.unique(segments[r][segments[r] > 0]):
            where = np.nonzero(segments[r] == s)[0]
            content = where[~np.isin(tokens[r, where], (bos, eos))]
            mods = modality[r, content]
            runs = [int(m) for i, m in enumerate(mods) if i == 0 or mods[i - 1] != m]
            if not runs:
                continue
            kind = _kind(runs)
            targets = where[where > 0] - 1  # target at t + 1 is scored at position t
            targets = targets[valid[r, targets]]
            target_mod = modality[r, targets + 1]
            if kind == "text_to_image":
                targets = targets[target_mod == IMAGE]
            elif kind == "image_to_text":
                targets = targets[target_mod == TEXT]
            out[r, targets] = TASKS.index(kind)
    return out


def task_losses(ce_BxT: np.ndarray, tasks_BxT: np.ndarray) -> dict[str, dict[str, float]]:
    """{task: {"loss": mean CE (NaN where absent), "tokens": count}}."""
    out = {}
    for i, name in enumerate(TASKS):
        mask = tasks_BxT == i
        n = int(mask.sum())
        out[name] = {"loss": float(ce_BxT[mask].sum() / n) if n else float("nan"), "tokens": n}
    return out
