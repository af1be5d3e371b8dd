"""Packing: packed rows, padded rows and each example run alone give the same per-token loss."""

import functools
import json

import grain
import jax
import numpy as np
import pytest

from jaxpost import models
from jaxpost.data import Pipeline, packing_efficiency
from jaxpost.data.packing import SEQUENCE_FEATURES, BestFitPacker
from jaxpost.data.tasks import arithmetic

from tiny_models import tiny_config

TOK = arithmetic.tokenizer()


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, segment_ids=None, positions=None):
    return models.forward(cfg, params, tokens, segment_ids=segment_ids, positions=positions)


def _cross_entropy(logits, targets):
    """float64 NumPy: -log softmax(logits)[target], per position."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]


def _per_example(cfg, params, batches):
    """{example tokens: (loss sum, trained tokens)} from batches with segment ids."""
    out = {}
    for b in batches:
        logits = _forward(cfg, params, b["tokens"], b["segment_ids"], b["positions"])
        ce = _cross_entropy(logits, b["targets"]) * b["loss_mask"]
        for r in range(b["tokens"].shape[0]):
            for s in range(1, int(b["segment_ids"][r].max()) + 1):
                sel = b["segment_ids"][r] == s
                key = tuple(b["tokens"][r][sel].tolist())
                assert key not in out, "an example appeared twice in one epoch"
                out[key] = (ce[r][sel].sum(), b["loss_mask"][r][sel].sum())
    return out


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=128)
    seed = int(np.random.default_rng().integers(1 << 30))
    return cfg, jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(seed))


def test_packed_and_padded_losses_match_examples_alone(model):
    cfg, params = model
    rows = arithmetic.generate_split(int(np.random.default_rng().integers(1000)), 18, "train")
    common = dict(
        format="messages",
        max_length=96,
        batch_size=4,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
        process_index=0,
        process_count=1,
    )
    packed_pipe = Pipeline(rows, TOK, packing=True, **common)
    packed_batches = list(packed_pipe.iterator())
    padded_batches = list(Pipeline(rows, TOK, packing=False, **common).iterator())
    packed = _per_example(cfg, params, packed_batches)
    padded = _per_example(cfg, params, padded_batches)
    assert len(packed) == len(padded) == 18 and packed.keys() == padded.keys()
    assert max(int(b["segment_ids"].max()) for b in packed_batches) >= 2  # rows really pack

    # Reference: each example alone in a row, no segment ids, default positions. Right padding
    # to a fixed width cannot change a causal model's outputs at the real positions.
    total = {"packed": [0.0, 0.0], "padded": [0.0, 0.0], "alone": [0.0, 0.0]}
    for row in rows:
        ids, mask = TOK.encode_chat(row["messages"])
        n = len(ids)
        tokens = np.full((1, 96), TOK.pad_id, np.int32)
        tokens[0, :n] = ids
        ce = _cross_entropy(_forward(cfg, params, tokens)[0, : n - 1], tokens[0, 1:n])
        alone = (ce * np.asarray(mask[1:])).sum(), float(sum(mask[1:]))
        for name, got in (("packed", packed[tuple(ids)]), ("padded", padded[tuple(ids)])):
            np.testing.assert_allclose(got, alone, rtol=2e-5, err_msg=name)
            total[name][0] += got[0]
            total[name][1] += got[1]
        total["alone"][0] += alone[0]
        total["alone"][1] += alone[1]
    per_token = {k: s / n for k, (s, n) in total.items()}
    np.testing.assert_allclose(per_token["packed"], per_token["alone"], rtol=2e-5)
    np.testing.assert_allclose(per_token["padded"], per_token["alone"], rtol=2e-5)

    # Efficiency: packing fills rows better than one example per row, and the report agrees.
    eff_packed = np.mean([packing_efficiency(b) for b in packed_batches[:-1]])
    eff_padded = np.mean([packing_efficiency(b) for b in padded_batches[:-1]])
    assert eff_packed > 1.6 * eff_padded
    slots = sum(b["segment_ids"].size for b in packed_batches)
    real = sum(np.count_nonzero(b["segment_ids"]) for b in packed_batches)
    assert packed_pipe.report()["packing_efficiency"] == pytest.approx(real / slots)


def test_packed_row_layout():
    rows = arithmetic.generate_split(1, 6, "test")
    pipe = Pipeline(
        rows, TOK, max_length=96, batch_size=2, shuffle=False, process_index=0, process_count=1
    )
    b = next(pipe.iterator())
    for r in range(2):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        for s in range(1, seg.max() + 1):
            sel = np.flatnonzero(seg == s)
            assert np.all(np.diff(sel) == 1)  # contiguous
            np.testing.assert_array_equal(pos[sel], np.arange(len(sel)))
            # targets are shifted within the example: the last position trains nothing
            np.testing.assert_array_equal(b["targets"][r][sel[:-1]], b["tokens"][r][sel[1:]])
            assert b["loss_mask"][r][sel[-1]] == 0
        pad = seg == 0
        assert np.all(b["tokens"][r][pad] == TOK.pad_id) and np.all(b["loss_mask"][r][pad] == 0)


def _numbered(lengths):
    """Examples whose every token is the example's index (to find them in packed rows)."""
    return [
        {k: np.full(n, i, np.float32 if k == "loss_mask" else np.int32) for k in SEQUENCE_FEATURES}
        for i, n in enumerate(lengths)
    ]


def _best_fit_rows(examples, seq_len, bins, **kw):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    return BestFitPacker(ds, seq_len, pad_id=-1, num_bins=bins, **kw)


def _reference_best_fit(lengths, seq_len, bins, max_wait):
    """Plain Python: rows as lists of example indices, in the order they leave."""
    open_rows, out = [], []  # open: [used, [indices]]

    def leave(r):
        open_rows.remove(r)
        out.append(r[1])

    for i, n in enumerate(lengths):
        old = [r for r in open_rows if i - r[1][0] > max_wait]  # read i examples so far
        while old:
            leave(min(old, key=lambda r: r[1][0]))
            old = [r for r in open_rows if i - r[1][0] > max_wait]
        room = [r for r in open_rows if r[0] + n <= seq_len]
        if room:
            r = max(room, key=lambda r: r[0])
            r[0] += n
            r[1].append(i)
            if r[0] == seq_len:
                leave(r)
            continue
        if n == seq_len:  # a full row on its own leaves at once, taking no open slot
            out.append([i])
            continue
        full = max(open_rows, key=lambda r: r[0]) if len(open_rows) >= bins else None
        open_rows.append([n, [i]])
        if full:
            leave(full)
    while open_rows:
        leave(max(open_rows, key=lambda r: r[0]))
    return out


def test_best_fit_packer_keeps_every_example_and_fills_as_a_reference():
    """Every example lands once, whole and in order inside its row; the rows match a plain
    Python best fit over the same open rows (the fullest row leaves when an example fits none);
    and it fills more slots than grain's first fit, which emits all open rows at once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 129, 1500)
    rows = list(_best_fit_rows(_numbered(lengths), 128, 16))
    seen = []
    for row in rows:
        seg, pos, tok = row["segment_ids"], row["positions"], row["tokens"]
        assert np.all(tok[seg == 0] == -1) and np.all(row["loss_mask"][seg == 0] == 0)
        for s in range(1, seg.max() + 1):
            sel = np.flatnonzero(seg == s)
            i = int(tok[sel[0]])
            assert np.all(tok[sel] == i) and len(sel) == lengths[i]
            np.testing.assert_array_equal(pos[sel], np.arange(len(sel)))
            seen.append(i)
    assert sorted(seen) == list(range(len(lengths)))

    got = [[int(row["tokens"][row["segment_ids"] == s][0]) for s in range(1, row["segment_ids"].max() + 1)] for row in rows]  # fmt: skip  # noqa: E501
    assert got == _reference_best_fit(lengths.tolist(), 128, 16, max_wait=8 * 16)

    fill = lengths.sum() / (len(rows) * 128)
    ds = grain.MapDataset.source(_numbered(lengths)).to_iter_dataset()
    first_fit = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=dict.fromkeys(SEQUENCE_FEATURES, 128), num_packing_bins=16
    )
    assert fill > 0.93 and fill > lengths.sum() / (len(list(first_fit)) * 128) + 0.05


@pytest.mark.parametrize("max_wait", [None, 5])
def test_best_fit_packer_resumes_anywhere(max_wait):
    """A state taken after any row (through JSON) resumes to the same remaining rows; with a
    short max_wait rows leave once that many examples were read since they opened."""
    lengths = np.random.default_rng(1).integers(1, 65, 300)
    examples = _numbered(lengths)
    rows = list(_best_fit_rows(examples, 64, 8, max_wait=max_wait))
    for cut in range(len(rows) + 1):
        it = iter(_best_fit_rows(examples, 64, 8, max_wait=max_wait))
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        if max_wait:
            assert state["read"] - state["anchor"] <= max_wait + 1
        resumed = iter(_best_fit_rows(examples, 64, 8, max_wait=max_wait))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(rows) - cut
        for a, b in zip(rest, rows[cut:], strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_best_fit_packer_refuses_bad_input():
    it = iter(_best_fit_rows(_numbered([3, 9]), 8, 4))
    with pytest.raises(ValueError, match="example of 9 tokens does not fit in a row of 8"):
        next(it)
    old = {"parent": {"next_index": 0}, "next_row": 0, "counter": 0}  # grain's first-fit state
    with pytest.raises(ValueError, match="not written by the best-fit packer"):
        iter(_best_fit_rows(_numbered([3]), 8, 4)).set_state(old)
    it = iter(_best_fit_rows(_numbered([5, 4, 12, 9]), 16, 2))
    assert next(it)["segment_ids"].max() == 1  # the 12 leaves; 5 + 4 and 9 stay open
    shorter = iter(_best_fit_rows(_numbered([5, 4, 12, 9]), 8, 2))
    with pytest.raises(ValueError, match="rows longer than 8 tokens .*max_length was lowered"):
        shorter.set_state(it.get_state())
    with pytest.raises(ValueError, match="num_packing_bins must be at least 1"):
        _best_fit_rows(_numbered([3]), 8, 0)
