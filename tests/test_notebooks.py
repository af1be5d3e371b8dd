"""Execute the notebooks end to end on small settings and check what they report:
notebooks/quickstart.ipynb (a model trained here) and notebooks/hf_lora_sft.ipynb (a tiny random
checkpoint saved by `transformers`, with a BPE tokenizer made here).

Each notebook runs in a fresh python3 kernel of this environment (nbclient); the test injects its
parameters papermill-style (a cell right after the one tagged "parameters") and reads the JSON the
cell tagged "results" prints. The kernel gets one CPU device: the 8 simulated devices the test
suite sets up would only slow the notebook's single-host walkthrough down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "notebooks" / "quickstart.ipynb"
HF_LORA_SFT = REPO / "notebooks" / "hf_lora_sft.ipynb"


def _tagged(nb, tag: str) -> int:
    found = [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise AssertionError(f"expected one cell tagged {tag!r}, got {found}")
    return found[0]


def _execute(path: Path, parameters: str) -> dict:
    """Run the notebook with `parameters` injected after its parameters cell; its RESULTS."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(_tagged(nb, "parameters") + 1, nbformat.v4.new_code_cell(parameters))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={})
    client.execute(cwd=str(REPO), env=env)
    return json.loads(_stdout(nb.cells[_tagged(nb, "results")]).strip().splitlines()[-1])


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


@pytest.mark.parametrize("path", [QUICKSTART, HF_LORA_SFT], ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    assert not with_outputs, f"cells {with_outputs} of {path.name} have outputs; clear them"
    assert all(c.execution_count is None for c in nb.cells if c.cell_type == "code")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("notebook")
    results = _execute(QUICKSTART, f"SMALL = True\nWORKDIR = {str(workdir)!r}\nSEED = 3")
    return results, workdir


def test_quickstart_runs_and_learns(executed):
    results, workdir = executed
    assert results["backend"] == "cpu"
    # Full training from random init must lower the loss well below its start (ln 32 ~ 3.47).
    assert results["pretrain_loss_last"] < 0.8 * results["pretrain_loss_first"], results
    # LoRA starts exactly at the pretrained model (B = 0) and keeps lowering the loss: the mean
    # over its last 5 steps below that over its first 5 (by ~0.05 over seeds 3-5; one batch's
    # loss against another's moved by as much as 0.03 either way).
    assert results["lora_loss_end"] < results["lora_loss_start"] - 0.01, results
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    # r=16 on 7 linears x 2 layers: (in + out) * r per module.
    h, i, q, kv = 64, 192, 4 * 16, 2 * 16
    per_layer = (h + q) + (h + kv) * 2 + (q + h) + (h + i) * 2 + (i + h)
    assert results["lora_trainable_params"] == 2 * 16 * per_layer
    assert results["merge_max_abs_error"] < 1e-4


def test_quickstart_exports(executed):
    _, workdir = executed
    adapter = workdir / "peft_adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert (workdir / "hf_model" / "config.json").exists()


def _hf_checkpoint(path: Path) -> None:
    """A tiny Qwen2 saved by `transformers` (weights redrawn at a scale that moves the logits),
    with the tests' BPE tokenizer and its ChatML template."""
    import bpe_tokenizer
    import torch
    import transformers
    from models import hf_tiny

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=bpe_tokenizer.VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_tiny.randomize(model, gemma=False).save_pretrained(path)
    bpe_tokenizer.save(path)


@pytest.mark.parametrize("variant", ["lora_builtin_task", "qlora_own_jsonl"])
def test_hf_lora_sft_notebook(tmp_path, variant):
    """LoRA on the built-in task written as chat JSONL; QLoRA on a chat JSONL of one's own
    (its last rows held out). The loss falls, and the exported adapter on `transformers` +
    `peft`, and the merged checkpoint, give jaxpost's logits."""
    from jaxpost.data import tasks

    checkpoint = tmp_path / "checkpoint"
    _hf_checkpoint(checkpoint)
    qlora = variant.startswith("qlora")
    parameters = (
        f"HF_PATH = {str(checkpoint)!r}\nWORKDIR = {str(tmp_path / 'work')!r}\nQLORA = {qlora}\n"
        "STEPS = 30\nBATCH_SIZE = 8\nMAX_LENGTH = 96\nNUM_EVAL = 8\nLEARNING_RATE = 3e-3\n"
        "MAX_NEW_TOKENS = 12\nSEED = 1"
    )
    if variant == "qlora_own_jsonl":
        # TRL's conversational prompt / completion rows, a blank line, and one row over
        # MAX_LENGTH (cut from the right by the default TRUNCATION).
        rows = tasks.get("arithmetic").generate_split(5, 300, "train")
        system = {"role": "system", "content": "Show your work."}
        lines = []
        for i, r in enumerate(rows):
            prompt, reply = [system, r["messages"][0]], [r["messages"][1]]
            if i == 7:
                reply = [{"role": "assistant", "content": "1+1=2 " * 60}]
            row = {"prompt": prompt, "completion": reply}
            lines.append(json.dumps(row) + ("\n" if i == 20 else ""))
        (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
        parameters += f"\nTRAIN_JSONL = {str(tmp_path / 'mine.jsonl')!r}"
    results = _execute(HF_LORA_SFT, parameters)

    assert (results["backend"], results["model_type"], results["qlora"]) == ("cpu", "qwen2", qlora)
    # From a random model (ln 320 ~ 5.77) 30 steps lower the mean loss by ~1.4.
    assert results["loss_end"] < results["loss_start"] - 0.2, results
    # r=16 on 7 linears x 2 layers (in + out) * r; q 4 x 16, k / v 2 x 16 wide.
    h, i, q, kv = 64, 128, 64, 32
    assert results["lora_trainable_params"] == 2 * 16 * (
        (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    )
    work = tmp_path / "work"
    adapter = sorted(p.name for p in (work / "peft_adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(adapter)
    if qlora:
        assert results["accuracy_before"] is None and results["peft_max_abs_diff"] is None
        assert not (work / "hf_model").exists()
        assert results["training_rows"] == 300 - 8 and results["rows_cut"] == 1
    else:
        assert 0.0 <= results["accuracy_before"] <= 1.0 and 0.0 <= results["accuracy_after"] <= 1
        assert results["peft_max_abs_diff"] < 1e-4 and results["merged_max_abs_diff"] < 1e-4
