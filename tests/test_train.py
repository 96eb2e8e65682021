"""`edge-genarm train` on tiny models and a tiny separable preference set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_engine
from edge_genarm.cli import main
from edge_genarm.train.data import Encoder, load_pairs
from edge_genarm.train.trainer import TrainConfig, train

TOPICS = ["cats", "rain", "music", "coffee", "trains", "books", "winter", "gardens", "the sea",
          "bread", "maths", "cities"]


GOOD = ["good", "kind", "warm", "bright", "lovely", "happy", "gentle", "sunny"]
BAD = ["bad", "cruel", "cold", "dark", "ugly", "sad", "harsh", "gloomy"]


def prefs(path: Path, bad: bool = False) -> Path:
    """Positive against negative words, paired differently per row, so that an untrained model
    sides with each about as often as not."""
    rows = [json.dumps({"prompt": t.format(x), "chosen": f"{x.capitalize()} are {GOOD[i % 8]}.",
                        "rejected": f"{x.capitalize()} are {BAD[(i * 3 + j) % 8]}."})
            for i, x in enumerate(TOPICS) for j, t in enumerate(("Tell me about {}.",
                                                                 "What do you think of {}?"))]
    if bad:
        rows[2:2] = ['{"prompt": "p", "chosen": "same", "rejected": "same"}', "not json",
                     '{"prompt": "p", "chosen": "x"}', '{"prompt": "p", "chosen": " ", '
                     '"rejected": "y"}', json.dumps({"prompt": "word " * 300, "chosen": "a",
                                                     "rejected": "b"})]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_lines_are_counted_named_and_skipped(tmp_path):
    enc = Encoder(lambda s: list(range(len(s.split()) + 3)), lambda s: [1, 2, 3])
    pairs, skipped = load_pairs(prefs(tmp_path / "p.jsonl", bad=True), enc, max_length=64)
    assert len(pairs) == 24
    assert [(s.line, s.reason) for s in skipped] == [
        (3, "chosen and rejected are identical"), (4, "not valid JSON"),
        (5, "missing field 'rejected'"), (6, "empty chosen response"),
        (7, "prompt of 303 tokens leaves no room within max length 64")]


def test_training_lowers_the_loss_and_learns_the_preference(tmp_path, tiny):
    """A GGUF base: dequantized for PyTorch, its own tokenizer and template encode the data."""
    res = CliRunner().invoke(main, ["train", "--base", tiny.base, "--data",
                                    prefs(tmp_path / "p.jsonl", bad=True), "--out",
                                    tmp_path / "run", "--epochs", "4", "--lr", "1e-2",
                                    "--eval-fraction", "0.25", "--lora-r", "4"])
    assert res.exit_code == 0, res.stderr
    lines = res.stderr.splitlines()
    assert "skipped " + str(tmp_path / "p.jsonl") + ":4: not valid JSON" in lines
    assert "24 pairs (5 lines skipped)" in lines
    held = next(line for line in lines if line.startswith("held-out preference accuracy"))
    assert float(held.split()[3]) >= 0.8
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    losses, accs = state["result"]["losses"], state["result"]["accuracies"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02
    assert np.mean(accs[-3:]) > np.mean(accs[:3])
    arm = tmp_path / "run" / "arm.gguf"
    with make_engine(tiny.base) as e:  # the ARM loads and changes guided output
        ids = e.model.tokenize("Tell me about dogs.", add_special=True)
        plain = e.advance([e.new_sequence()], [ids]).copy()
    with make_engine(tiny.base, [(arm, 3.0)]) as e:
        assert e.arms[0].kind == "lora"
        guided = e.advance([e.new_sequence()], [ids])
    assert np.abs(guided - plain).max() > 1e-3


def test_resume_continues_where_the_checkpoint_left_off(tmp_path, hf_llama):
    from edge_genarm.train.cli import _hf_encoder

    pairs, _ = load_pairs(prefs(tmp_path / "p.jsonl"), _hf_encoder(hf_llama), 128)
    config = TrainConfig(epochs=2, lr=5e-3, batch_size=4, eval_fraction=0.25, save_every=3)
    _, whole = train(hf_llama, pairs, config, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_step_5(step, total, loss, acc):
        if step == 5:
            raise Killed  # as if the process died after step 5, its last checkpoint at step 3

    with pytest.raises(Killed):
        train(hf_llama, pairs, config, tmp_path / "split", on_step=kill_at_step_5)
    _, resumed = train(hf_llama, pairs, config, tmp_path / "split", resume=True)
    assert resumed.steps == whole.steps == 10
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-4, atol=1e-5)
    assert resumed.eval_accuracy == whole.eval_accuracy


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, smollm2):
    from hf_models import write_smollm2_tokenizer, write_tiny_hf_model

    d = tmp_path_factory.mktemp("train-hf")
    return write_tiny_hf_model(d / "llama", "llama", write_smollm2_tokenizer(smollm2, d / "tok"))


def test_full_fine_tuning_writes_a_full_gguf_model(tmp_path, hf_llama):
    res = CliRunner().invoke(main, ["train", "--base", hf_llama, "--data",
                                    prefs(tmp_path / "p.jsonl"), "--out", tmp_path / "run",
                                    "--full", "--lr", "1e-4", "--eval-fraction", "0"])
    assert res.exit_code == 0, res.stderr
    from edge_genarm.gguf_file import inspect_gguf

    info = inspect_gguf(tmp_path / "run" / "arm.gguf")
    assert not info.is_adapter and "token_embd.weight" in info.shapes
