"""The built-in arithmetic task: splits, worked solutions, tokenizer, answer extraction, metric."""

import json
import random
import re

import pytest

from jaxpost.data import tasks
from jaxpost.data.tasks import arithmetic


def test_splits_deterministic_and_disjoint():
    a = arithmetic.generate_split(3, 400, "train")
    assert a == arithmetic.generate_split(3, 400, "train")
    assert a != arithmetic.generate_split(4, 400, "train")
    train = {r["prompt"] for s in (3, 4, 5) for r in arithmetic.generate_split(s, 2000, "train")}
    test = {r["prompt"] for s in (0, 3) for r in arithmetic.generate_split(s, 1000, "test")}
    assert len(test) > 1000 and not train & test
    rows = arithmetic.generate_split(0, 300, "test")
    assert len({r["prompt"] for r in rows}) == 300  # no duplicates inside a split


def _check_steps(prompt: str, completion: str) -> None:
    """Independently re-derive the column algorithm from the text and check every step."""
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", prompt).groups()
    steps, answer_line = completion.split("\n")
    width = max(len(a), len(b))
    da, db = a.zfill(width)[::-1], b.zfill(width)[::-1]
    carry = 0
    digits = []
    for k, step in enumerate(steps.split(" ")):
        lhs, rhs = step.split("=")
        terms = [int(t) for t in re.split(r"[+-]", lhs)]
        value = terms[0] + sum(terms[1:]) if op == "+" else terms[0] - sum(terms[1:])
        assert value == int(rhs), step
        if op == "+":
            assert terms[:2] == [int(da[k]), int(db[k])] and sum(terms[2:]) == carry, step
            carry, digit = divmod(value, 10)
        else:
            top, sub = terms[0], terms[-1]
            assert top % 10 == int(da[k]) and sub == int(db[k]), step
            assert sum(terms[1:-1]) == carry, step  # the borrow from the previous column
            assert 0 <= value <= 9, step
            carry, digit = top // 10, value
        digits.append(digit)
    expected = int(a) + int(b) if op == "+" else int(a) - int(b)
    column_result = int("".join(map(str, reversed(digits)))) + carry * 10**width * (op == "+")
    assert column_result == expected
    assert answer_line == f"answer: {expected}"


def test_worked_solutions_are_correct():
    rows = arithmetic.generate_split(11, 500, "train") + arithmetic.generate_split(1, 200, "test")
    for r in rows:
        _check_steps(r["prompt"], r["completion"])
        assert r["answer"] == str(eval(r["prompt"]))  # noqa: S307 - digits and one operator
        assert r["messages"][1]["content"] == r["completion"]
    # edge cases: chains of carries and borrows, and a zero result
    for a, op, b in [(999, "+", 1), (1000, "-", 1), (300, "-", 5), (57, "-", 57), (5, "+", 5)]:
        text, result = arithmetic.solve(a, op, b)
        _check_steps(f"{a}{op}{b}", text)


def test_sequences_are_short_and_fit_the_tokenizer():
    tok = arithmetic.tokenizer()
    assert tok.vocab_size <= 32
    lengths = [len(tok.encode_chat(r["messages"])[0]) for r in arithmetic.generate_split(0, 1000)]
    assert max(lengths) <= 64
    task = tasks.get("arithmetic")
    longest_completion = max(
        len(tok.encode(r["completion"])) + 1 for r in arithmetic.generate_split(2, 1000)
    )
    assert longest_completion <= task.max_new_tokens


def test_tokenizer_round_trip_and_chat():
    tok = arithmetic.tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice(arithmetic.ALPHABET) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<bos>12<eos>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 4
    assert tok.decode(ids, skip_special_tokens=True) == "12"
    msgs = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    ids, mask = tok.encode_chat(msgs)
    assert (
        tok.decode(ids) == tok.apply_chat_template(msgs) == "<bos><user>1+2<eos><assistant>3<eos>"
    )
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "3<eos>"
    gen = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    assert gen.endswith("<assistant>") and tok.encode(gen) == tok.encode_chat(msgs[:1], True)[0]
    with pytest.raises(ValueError, match="character 'x' is not in the tokenizer's alphabet"):
        tok.encode("1x2")
    with pytest.raises(ValueError, match="role 'tool' is not one of"):
        tok.encode_chat([{"role": "tool", "content": "1"}])


def test_answer_extraction_and_metric():
    assert arithmetic.extract_answer("1+2=3\nanswer: 0042") == "42"
    assert arithmetic.extract_answer("answer: 1\nanswer: 7<eos>") == "7"
    assert arithmetic.extract_answer("7+5=12") is None
    assert arithmetic.score("x\nanswer: 432", "432") == 1.0
    assert arithmetic.score("x\nanswer: 431", "432") == 0.0
    assert arithmetic.score("no answer line", "432") == 0.0
    rows = arithmetic.generate_split(5, 40, "test")
    completions = [r["completion"] if i % 4 else "answer: -1" for i, r in enumerate(rows)]
    answers = [r["answer"] for r in rows]
    assert arithmetic.accuracy(completions, answers) == pytest.approx(0.75)
    assert tasks.get("arithmetic").score is arithmetic.score
    with pytest.raises(ValueError, match="unknown task 'gsm8k'"):
        tasks.get("gsm8k")
    with pytest.raises(ValueError, match="2 completions but 1 reference answers"):
        arithmetic.accuracy(["a", "b"], ["1"])


def test_write_jsonl(tmp_path):
    rows = arithmetic.generate_split(0, 20, "test")
    path = tmp_path / "test.jsonl"
    assert arithmetic.write_jsonl(rows, path) == 20
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    from jaxpost.data.tasks.__main__ import main

    main(["arithmetic", "--split=test", "--n=20", f"--out={tmp_path / 'cli.jsonl'}"])
    assert (tmp_path / "cli.jsonl").read_text() == path.read_text()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split 'val' is not one of"):
        arithmetic.generate_split(0, 1, "val")
    with pytest.raises(ValueError, match="could only find"):
        arithmetic.generate_split(0, 100, "test", min_digits=1, max_digits=1, ops=("+",))
