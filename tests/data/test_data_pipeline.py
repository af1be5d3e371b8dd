"""Pipeline: sources, bad inputs, shuffling, epochs, process shards, iterator state."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxpost.data import DataError, MalformedRow, Pipeline, PipelineConfig, open_source
from jaxpost.data.tasks import arithmetic

TOK = arithmetic.tokenizer()
ONE_PROCESS = {"process_index": 0, "process_count": 1}


def _rows(n, seed=0):
    return arithmetic.generate_split(seed, n, "train")


def _prompts(batch):
    """The problems in a prompt_answer batch, decoded from its tokens."""
    out = []
    for ids, n in zip(batch["prompt_tokens"], batch["prompt_lengths"]):
        text = TOK.decode(ids[:n])
        out.append(text.removeprefix("<bos><user>").removesuffix("<eos><assistant>"))
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_sources_give_identical_batches(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    rows = _rows(40)
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    flat = [{k: r[k] for k in ("prompt", "completion", "answer")} for r in rows]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "d.parquet")
    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for r in rows:
        writer.write(json.dumps(r).encode())
    writer.close()
    cfg = PipelineConfig(format="prompt_completion", max_length=96, batch_size=4, **ONE_PROCESS)
    want = _take(Pipeline(rows, TOK, cfg).iterator(), 5)
    for src in ("d.jsonl", "d.parquet", "d.array_record"):
        _assert_same(_take(Pipeline(tmp_path / src, TOK, cfg).iterator(), 5), want)
    # a source survives pickling (grain worker processes) and reopens its file
    src = open_source(jsonl)
    assert src[7] == pickle.loads(pickle.dumps(src))[7] and src.where(7) == "d.jsonl row 8"
    # several files are read as one dataset
    two = Pipeline([jsonl, tmp_path / "d.parquet"], TOK, cfg, shuffle=False)
    assert two.num_rows == 80


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"prompt": "1+2", "answer": ',
            "d.jsonl row 3: invalid JSON (Expecting value at column 29)",
        ),
        ('["1+2", "3"]', "d.jsonl row 3: expected a JSON object, got list"),
        ('{"prompt": "1+2"}', "d.jsonl row 3: 'answer' is missing; expected keys prompt, answer"),
        ('{"prompt": 12, "answer": "3"}', "d.jsonl row 3: 'prompt' must be a string or a list"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, line, message):
    good = json.dumps({"prompt": "1+2", "answer": "3"})
    path = _write_jsonl(tmp_path / "d.jsonl", [good, good, line, good])
    cfg = PipelineConfig(format="prompt_answer", packing=False, max_length=32, **ONE_PROCESS)
    with pytest.raises(MalformedRow) as err:
        Pipeline(path, TOK, cfg)
    assert message in str(err.value)
    pipe = Pipeline(path, TOK, cfg, skip_malformed=True, batch_size=3)
    report = pipe.report()
    assert report["malformed_rows"] == 1 and report["valid_rows"] == 3
    assert report["malformed_examples"][0].startswith("d.jsonl row 3: ")
    assert _prompts(next(pipe.iterator())) == ["1+2"] * 3


def test_empty_datasets(tmp_path):
    cfg = PipelineConfig(format="text", max_length=32, **ONE_PROCESS)
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="dataset empty.jsonl is empty"):
        Pipeline(empty, TOK, cfg)
    with pytest.raises(DataError, match="dataset <memory> is empty"):
        Pipeline([], TOK, cfg)
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"txt": "1"}', "{"])
    with pytest.raises(DataError, match="all 2 rows are malformed"):
        Pipeline(bad, TOK, cfg, skip_malformed=True)
    with pytest.raises(DataError, match="does not exist"):
        Pipeline(tmp_path / "missing.jsonl", TOK, cfg)
    with pytest.raises(DataError, match="cannot tell the format of"):
        Pipeline(str(tmp_path / "d.csv"), TOK, cfg)


def test_too_long_prompt_is_an_error_naming_the_row(tmp_path):
    rows = [{"prompt": "1+2", "completion": "3"}] * 4 + [{"prompt": "9" * 40, "completion": "1"}]
    path = _write_jsonl(tmp_path / "long.jsonl", [json.dumps(r) for r in rows])
    cfg = PipelineConfig(
        format="prompt_completion", max_length=24, batch_size=5, shuffle=False, **ONE_PROCESS
    )
    with pytest.raises(
        DataError,
        match=r"long.jsonl row 5: 46 tokens exceed max_length 24 \(the prompt alone is 44",
    ):
        next(Pipeline(path, TOK, cfg).iterator())
    dropped = Pipeline(path, TOK, cfg, truncation="drop", batch_size=2, num_epochs=1)
    batches = list(dropped.iterator())
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 4
    assert dropped.report()["dropped_rows"] == 1
    assert dropped.report()["dropped_examples"] == [
        "long.jsonl row 5: longer than max_length (46 > 24)"
    ]
    assert dropped.report()["truncated_rows"] == 0
    # Kept but cut (the prompt's front goes): counted and shown too, once per row.
    cut = Pipeline(path, TOK, cfg, truncation="truncate_left", num_epochs=2, drop_remainder=False)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in cut.iterator()) == 10
    assert cut.report()["dropped_rows"] == 0 and cut.report()["truncated_rows"] == 1
    assert cut.report()["truncated_examples"] == [
        "long.jsonl row 5: 46 tokens cut to 24 (truncate_left)"
    ]
    # Cutting the end leaves that row nothing to train on: dropped, not truncated.
    right = Pipeline(path, TOK, cfg, truncation="truncate_right", num_epochs=1)
    list(right.iterator())
    assert right.report()["dropped_rows"] == 1 and right.report()["truncated_rows"] == 0


def test_shuffle_is_deterministic_per_seed():
    rows = _rows(64)
    cfg = PipelineConfig(format="prompt_answer", packing=False, batch_size=8, max_length=32)
    a = _take(Pipeline(rows, TOK, cfg, seed=1, **ONE_PROCESS).iterator(), 8)
    b = _take(Pipeline(rows, TOK, cfg, seed=1, **ONE_PROCESS).iterator(), 8)
    c = _take(Pipeline(rows, TOK, cfg, seed=2, **ONE_PROCESS).iterator(), 8)
    _assert_same(a, b)
    order = [p for x in a for p in _prompts(x)]
    assert order != [p for x in c for p in _prompts(x)]
    assert sorted(order) == sorted(r["prompt"] for r in rows)  # one epoch = a permutation
    plain = Pipeline(rows, TOK, cfg, shuffle=False, **ONE_PROCESS).iterator()
    assert [p for x in _take(plain, 8) for p in _prompts(x)] == [r["prompt"] for r in rows]


def test_epochs_reshuffle_and_stop():
    rows = _rows(30)
    cfg = PipelineConfig(
        format="prompt_answer", packing=False, batch_size=5, max_length=32, num_epochs=3
    )
    batches = list(Pipeline(rows, TOK, cfg, **ONE_PROCESS).iterator())
    assert len(batches) == 18
    seen = [p for b in batches for p in _prompts(b)]
    epochs = [seen[i * 30 : (i + 1) * 30] for i in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(r["prompt"] for r in rows)
    assert epochs[0] != epochs[1] != epochs[2]


def test_process_shards_are_disjoint_and_equal():
    rows = _rows(50)
    cfg = PipelineConfig(format="prompt_answer", packing=False, batch_size=4, max_length=32)
    shards = []
    for index in range(3):
        pipe = Pipeline(rows, TOK, cfg, num_epochs=1, process_index=index, process_count=3)
        shards.append([p for b in pipe.iterator() for p in _prompts(b)])
        assert pipe.report()["shard_rows"] == 16
    assert [len(s) for s in shards] == [16, 16, 16]  # 16 rows -> 4 batches of 4 each
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 48
    with pytest.raises(ValueError, match="process_index 3 is outside"):
        Pipeline(rows, TOK, cfg, process_index=3, process_count=3)


def test_uneven_shards_deal_out_every_row():
    """even_shards=False (evaluation): 50 rows over 3 processes are 17 / 17 / 16, all 50."""
    rows = _rows(50)
    cfg = PipelineConfig(format="prompt_answer", packing=False, batch_size=4, max_length=32,
                         num_epochs=1, drop_remainder=False, even_shards=False)  # fmt: skip
    shards = [
        [p for b in Pipeline(rows, TOK, cfg, process_index=i, process_count=3) for p in _prompts(b)]
        for i in range(3)
    ]
    assert [len(s) for s in shards] == [17, 17, 16]
    assert sorted(sum(shards, [])) == sorted(r["prompt"] for r in rows)
    with pytest.raises(DataError, match="2 valid rows cannot give each of 3 processes"):
        Pipeline(rows[:2], TOK, cfg, process_index=0, process_count=3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"format": "messages", "packing": True},
        {"format": "messages", "packing": False, "num_epochs": 2},
        {"format": "prompt_answer", "packing": False},
        {"format": "preference", "packing": False},
    ],
)
def test_iterator_state_restores_exactly(overrides):
    rows = [dict(r, chosen=r["completion"], rejected="answer: 0") for r in _rows(45)]
    cfg = PipelineConfig(max_length=96, batch_size=4, seed=7, **ONE_PROCESS, **overrides)
    it = Pipeline(rows, TOK, cfg).iterator()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
    want = _take(it, 12)  # crosses an epoch boundary (45 rows, 4 per batch, packed 2 per row)
    resumed = Pipeline(rows, TOK, cfg).iterator(state)
    _assert_same(_take(resumed, 12), want)


def test_packing_efficiency_is_reported():
    pipe = Pipeline(_rows(100), TOK, format="messages", max_length=96, batch_size=8, **ONE_PROCESS)
    batches = _take(pipe.iterator(), 6)
    report = pipe.report()
    real = sum(np.count_nonzero(b["segment_ids"]) for b in batches)
    assert report["packing_efficiency"] == pytest.approx(real / (6 * 8 * 96))
    assert 0.7 < report["packing_efficiency"] <= 1.0  # ~41-token examples, 2 per 96-token row
    assert report["examples_per_row"] >= 1.8
    with pytest.raises(ValueError, match="packing is not supported for the 'preference'"):
        PipelineConfig(format="preference", packing=True)
    prompts = Pipeline(_rows(8), TOK, format="prompt_answer", packing=True, **ONE_PROCESS)
    assert next(prompts.iterator())["prompt_tokens"].shape == (8, 256)  # padded, not packed


def test_tokenizer_rejection_names_the_row():
    rows = _rows(3)
    rows[1] = {
        "messages": [{"role": "tool", "content": "1"}, {"role": "assistant", "content": "2"}]
    }
    pipe = Pipeline(rows, TOK, max_length=96, batch_size=3, shuffle=False, **ONE_PROCESS)
    with pytest.raises(DataError, match=r"<memory> row 2: could not tokenize the row: message 0"):
        next(pipe.iterator())


def test_packer_keeps_more_rows_open_than_a_batch():
    """The packer keeps at least 64 rows open (MIN_PACKING_BINS) whatever the
    batch: more open rows leave fewer slots empty. Examples of 2 to 96 tokens in 96-token
    rows; a batch of 4 rows open at a time (the old default) filled fewer."""
    rng = np.random.default_rng(0)
    rows = [{"text": "1" * int(n)} for n in rng.integers(0, 95, 600)]
    fill = {}
    for bins in (None, 4):
        cfg = PipelineConfig(
            format="text", max_length=96, batch_size=4, num_epochs=1, shuffle=False,
            drop_remainder=False, num_packing_bins=bins, **ONE_PROCESS,
        )  # fmt: skip
        pipe = Pipeline(rows, TOK, cfg)
        batches = list(pipe.iterator())
        assert sum(int(b["segment_ids"].max(1).sum()) for b in batches) == len(rows)
        fill[bins] = pipe.report()["packing_efficiency"]
    assert fill[None] > fill[4] + 0.02, fill
