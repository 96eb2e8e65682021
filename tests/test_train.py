"""`edge-genarm train` on tiny models and a tiny separable preference set: the loss against a
hand computation, what it learns (in PyTorch and, through the written GGUF adapter, in
llama.cpp), a real SIGKILL and --resume, and every refusal of the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_engine, reference_log_softmax
from edge_genarm.cli import main
from edge_genarm.llama import Context
from edge_genarm.train.base import gguf_encoder
from edge_genarm.train.checks import run_settings
from edge_genarm.train.data import Encoder, load_pairs
from edge_genarm.train.trainer import TrainConfig, split

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
    path = prefs(tmp_path / "p.jsonl", bad=True)
    path.write_bytes(path.read_bytes() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    pairs, skipped = load_pairs(path, enc, max_length=64)
    assert len(pairs) == 24
    assert [(s.line, s.reason) for s in skipped] == [
        (3, "chosen and rejected are identical"), (4, "not valid JSON"),
        (5, "missing field 'rejected'"), (6, "empty chosen response"),
        (7, "prompt of 303 tokens leaves no room within max length 64"), (30, "not UTF-8 text")]


# ------------------------------------------------------------------------------------------------
# What training learns, in PyTorch and in llama.cpp

TRAIN_ARGS = ["--epochs", "4", "--lr", "1e-2", "--eval-fraction", "0.25", "--lora-r", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """One LoRA ARM trained from the tiny GGUF base through the real CLI."""
    d = tmp_path_factory.mktemp("trained")
    data = prefs(d / "p.jsonl", bad=True)
    res = CliRunner().invoke(main, ["train", "--base", tiny.base, "--data", data,
                                    "--out", d / "run", *TRAIN_ARGS])
    assert res.exit_code == 0, res.stderr
    return d, data, res.stderr


def test_training_lowers_the_loss_and_learns_the_preference(trained):
    """A GGUF base: dequantized for PyTorch, its own tokenizer and template encode the data."""
    d, data, stderr = trained
    lines = stderr.splitlines()
    assert f"skipped {data}:4: not valid JSON" in lines
    assert "24 pairs (5 lines skipped)" in lines
    held = next(line for line in lines if line.startswith("held-out preference accuracy"))
    assert float(held.split()[3]) >= 0.8
    state = torch.load(d / "run" / "checkpoint" / "state.pt", weights_only=False)
    losses, accs = state["result"]["losses"], state["result"]["accuracies"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02
    assert np.mean(accs[-3:]) > np.mean(accs[:3])


def _torch_margins(model, pairs) -> np.ndarray:
    """log pi(chosen | prompt) - log pi(rejected | prompt), each the response tokens' log-probs
    summed as the loss sums them; all sequences in one forward, right-padded (causal attention:
    the padding after a sequence does not reach it)."""
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    totals = np.zeros(len(seqs))
    for i, (seq, start) in enumerate(zip(seqs, starts)):  # rows that predict response tokens
        logps = torch.log_softmax(logits[i, start - 1:len(seq) - 1].double(), -1)
        totals[i] = logps[torch.arange(len(seq) - start), seq[start:]].sum().item()
    return totals[:len(pairs)] - totals[len(pairs):]


def _llama_margins(ctx: Context, pairs) -> np.ndarray:
    """The same margins from a llama.cpp context: every chosen and rejected sequence is a
    sequence of its own, fed its prompt, then its response a token at a time, all of them
    side by side in each batch."""
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    ctx.clear()
    totals = np.zeros(len(seqs))
    live = list(range(len(seqs)))
    rows = ctx.decode([(i, seqs[i][0], 0) for i in live]).copy()
    for j in range(max(len(r) for _, r in seqs)):
        for row, i in zip(rows, live):
            totals[i] += reference_log_softmax(row)[seqs[i][1][j]]
        live = [i for i in live if j + 1 < len(seqs[i][1])]
        if not live:
            break
        rows = ctx.decode([(i, [seqs[i][1][j]], len(seqs[i][0]) + j) for i in live]).copy()
    return totals[:len(pairs)] - totals[len(pairs):]


# PyTorch (f32, one forward) against llama.cpp (f32 weights, F32 KV cache, the adapter applied
# as its own matmuls): the margins, sums of about 8 token log-probs each, measured at most 8e-6
# apart. A LoRA scale off by 2 % moves them by about 8e-2.
MARGIN_TOLERANCE = 1e-4


def test_the_written_arm_carries_the_trained_margins_into_llama_cpp(trained, tiny):
    """For every pair, log pi(chosen) - log pi(rejected) from llama.cpp running the base with
    the written GGUF adapter equals the trained PyTorch model's; it is not the untrained base's;
    and its held-out accuracy is the one training reported."""
    import transformers
    from peft import PeftModel

    d, data, stderr = trained
    pairs, _ = load_pairs(data, gguf_encoder(tiny.base), TrainConfig().max_length)
    _, held = split(pairs, 0.25, TrainConfig().seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "run" / "base-hf",
                                                             dtype=torch.float32).eval()
    torch_base = _torch_margins(base, pairs)
    model = PeftModel.from_pretrained(base, d / "run" / "adapter").eval()
    torch_arm = _torch_margins(model, pairs)
    with make_engine(tiny.base, [(d / "run" / "arm.gguf", 1.0)], n_seq_max=2 * len(pairs)) as e:
        assert e.arms[0].kind == "lora"
        llama_base = _llama_margins(e.base, pairs)
        llama_arm = _llama_margins(e.arms[0].context, pairs)
        off_scale = Context(e.model, e.base.settings, e.arms[0].context.adapter, 0.98)
        try:
            llama_off = _llama_margins(off_scale, pairs)
        finally:
            off_scale.close()
    assert np.abs(llama_base - torch_base).max() < MARGIN_TOLERANCE
    assert np.abs(llama_arm - torch_arm).max() < MARGIN_TOLERANCE
    assert np.abs(llama_off - torch_arm).max() > 100 * MARGIN_TOLERANCE  # the check has teeth
    # training moved the margins, and towards the chosen answers, on pairs it never saw too
    assert np.abs(llama_arm - llama_base).min() > 0.05
    index = {p.line: i for i, p in enumerate(pairs)}
    h = [index[p.line] for p in held]
    assert llama_arm[h].mean() > llama_base[h].mean() + 1.0
    assert llama_arm.mean() > llama_base.mean() + 1.0
    reported = float(next(line for line in stderr.splitlines()
                          if line.startswith("held-out preference accuracy")).split()[3])
    assert (llama_arm[h] > 0).mean() == pytest.approx(reported, abs=1e-3)
    assert (llama_base[h] > 0).mean() < reported


# ------------------------------------------------------------------------------------------------
# The loss, by hand


def _hand_logp(model, prompt: list[int], response: list[int]) -> float:
    """log pi(response | prompt): one sequence alone, no padding, summed in float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # rows predicting response
    return logps.gather(-1, torch.tensor(response)[:, None]).sum().item()


def _hand_loss(logps: np.ndarray, lengths: np.ndarray, beta: float, length_norm: bool) -> tuple:
    """(mean of -log sigmoid(beta * margin), share of positive margins); logps and lengths are
    pairs x (chosen, rejected)."""
    per_pair = logps / lengths if length_norm else logps
    margins = beta * (per_pair[:, 0] - per_pair[:, 1])
    return np.mean(np.logaddexp(0.0, -margins)), np.mean(margins > 0)  # log(1 + e^-m)


@pytest.mark.parametrize("length_norm", [False, True])
def test_the_loss_is_genarm_s_computed_by_hand(hf_llama, length_norm):
    """-log sigmoid(beta (log pi(chosen) - log pi(rejected))), averaged over the pairs, with log pi
    the sum of the response's token log-probs or, with --length-norm, that sum over the
    response's token count; responses of unequal lengths in one padded batch."""
    import transformers
    from edge_genarm.train.data import Pair
    from edge_genarm.train.trainer import pair_loss

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama,
                                                              dtype=torch.float32).eval()
    pairs = [Pair([1, 504, 2319], [1002, 57, 88, 2], [4093, 2], 1),
             Pair([1, 77], [310, 2], [9, 4400, 1201, 13, 870, 2], 2),
             Pair([1, 12, 4580, 911, 6], [2200, 41, 2], [35, 2], 3)]
    logps = np.array([[_hand_logp(model, p.prompt, r) for r in (p.chosen, p.rejected)]
                      for p in pairs])
    lengths = np.array([[len(p.chosen), len(p.rejected)] for p in pairs])
    beta = 0.7
    expected, accuracy = _hand_loss(logps, lengths, beta, length_norm)
    config = TrainConfig(beta=beta, length_norm=length_norm)
    with torch.no_grad():
        loss, acc = pair_loss(torch, model, pairs, config, pad_id=0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert acc == pytest.approx(accuracy)
    # the other normalisation, or another beta, would be far outside that tolerance
    assert abs(_hand_loss(logps, lengths, beta, not length_norm)[0] - expected) > 1e-2
    assert abs(_hand_loss(logps, lengths, 0.1, length_norm)[0] - expected) > 1e-2


# ------------------------------------------------------------------------------------------------
# Killed with SIGKILL, resumed


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, smollm2):
    from hf_models import write_smollm2_tokenizer, write_tiny_hf_model

    d = tmp_path_factory.mktemp("train-hf")
    return write_tiny_hf_model(d / "llama", "llama", write_smollm2_tokenizer(smollm2, d / "tok"))


# 18 training pairs, 9 batches an epoch, 5 optimizer steps an epoch (the last of one batch)
KILL_ARGS = ["--epochs", "3", "--batch-size", "2", "--grad-accum", "2", "--save-every", "2",
             "--lr", "5e-3", "--eval-fraction", "0.25", "--lora-r", "4", "--max-length", "128"]
KILL_STEPS = 15


def _progress(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "progress.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after_second_save(cmd: list, out: Path, log: Path) -> int:
    """Run cmd, SIGKILL it once a checkpoint past the first save exists; its last saved step."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while _progress(out) < 4:
            assert proc.poll() is None, f"training ended before it was killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _progress(out)


def _result(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=False)


def _gguf_tensors(path: Path) -> dict:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, hf_llama):
    data = prefs(tmp_path / "p.jsonl")
    common = ["--base", str(hf_llama), "--data", str(data), *KILL_ARGS]
    # the uninterrupted run, over an older finished run that --force replaces
    whole = tmp_path / "runs" / "whole"
    (whole / "checkpoint").mkdir(parents=True)
    (whole / "checkpoint" / "state.pt").write_bytes(b"an older run")
    (whole / "arm.gguf").write_bytes(b"an older ARM")
    res = CliRunner().invoke(main, ["train", *common, "--out", whole, "--force"])
    assert res.exit_code == 0, res.stderr
    whole_lines = res.stderr.splitlines()
    split_out = tmp_path / "not-yet" / "split"  # --out's missing parents are created
    saved = _kill_after_second_save(
        [sys.executable, "-m", "edge_genarm", "train", *common, "--out", str(split_out)],
        split_out, tmp_path / "killed.log")
    assert 4 <= saved < KILL_STEPS and not (split_out / "arm.gguf").exists()
    assert _result(split_out)["result"]["steps"] == saved  # the checkpoint on disk is whole
    # a kill in the middle of a save leaves a torn state.part beside it: never read
    (split_out / "checkpoint" / "state.part").write_bytes(b"\x80torn")
    refused = CliRunner().invoke(main, ["train", *common, "--out", split_out])
    assert refused.exit_code == 1 and "pass --resume to continue it" in refused.stderr
    res = CliRunner().invoke(main, ["train", *common, "--out", split_out, "--resume"])
    assert res.exit_code == 0, res.stderr
    held = [line for line in res.stderr.splitlines() if line.startswith("held-out")]
    assert held[0].split(";")[0] == next(
        line for line in whole_lines if line.startswith("held-out")).split(";")[0]
    a, b = _result(whole)["result"], _result(split_out)["result"]
    assert a["steps"] == b["steps"] == KILL_STEPS
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5, atol=1e-6)
    assert b["accuracies"] == a["accuracies"] and b["eval_accuracy"] == a["eval_accuracy"]
    # the schedule ends at 0 on the last step: steps were counted as they are taken
    assert _result(whole)["scheduler"]["_last_lr"] == [pytest.approx(0.0, abs=1e-12)]
    ta, tb = _gguf_tensors(whole / "arm.gguf"), _gguf_tensors(split_out / "arm.gguf")
    assert ta.keys() == tb.keys() and len(ta) == 4 * 2 * 2  # q, k, v, o x 2 layers x A, B
    for name in ta:
        np.testing.assert_allclose(tb[name], ta[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_full_fine_tuning_writes_a_full_gguf_model(tmp_path, hf_llama):
    res = CliRunner().invoke(main, ["train", "--base", hf_llama, "--data",
                                    prefs(tmp_path / "p.jsonl"), "--out", tmp_path / "run",
                                    "--full", "--lr", "1e-4", "--eval-fraction", "0"])
    assert res.exit_code == 0, res.stderr
    from edge_genarm.gguf_file import inspect_gguf

    info = inspect_gguf(tmp_path / "run" / "arm.gguf")
    assert not info.is_adapter and "token_embd.weight" in info.shapes


# ------------------------------------------------------------------------------------------------
# Every refusal of the command line

def _with(*extra, out="{d}/new", base="{base}", data="{d}/p.jsonl"):
    return ["--base", base, "--data", data, "--out", out, *extra]


# (arguments, exit status, the start of the one line after "Error: ")
REFUSALS = [
    (_with("--epochs", "0"), 1, "--epochs must be between 1 and 10000, got 0"),
    (_with("--epochs", "-1"), 1, "--epochs must be between 1 and 10000, got -1"),
    (_with("--epochs", "10001"), 1, "--epochs must be between 1 and 10000, got 10001"),
    (_with("--epochs", "1e3"), 2, "Invalid value for '--epochs': '1e3' is not a valid integer."),
    (_with("--beta", "0"), 1, "--beta must be a finite number in (0, 1000], got 0.0"),
    (_with("--beta", "-0.1"), 1, "--beta must be a finite number in (0, 1000], got -0.1"),
    (_with("--beta", "nan"), 1, "--beta must be a finite number in (0, 1000], got nan"),
    (_with("--beta", "inf"), 1, "--beta must be a finite number in (0, 1000], got inf"),
    (_with("--beta", "1e308"), 1, "--beta must be a finite number in (0, 1000], got 1e+308"),
    (_with("--beta", "x"), 2, "Invalid value for '--beta': 'x' is not a valid float."),
    (_with("--lr", "0"), 1, "--lr must be a finite number in (0, 1], got 0.0"),
    (_with("--lr", "-1e-3"), 1, "--lr must be a finite number in (0, 1], got -0.001"),
    (_with("--lr", "nan"), 1, "--lr must be a finite number in (0, 1], got nan"),
    (_with("--lr", "-inf"), 1, "--lr must be a finite number in (0, 1], got -inf"),
    (_with("--lr", "2"), 1, "--lr must be a finite number in (0, 1], got 2.0"),
    (_with("--warmup", "-0.1"), 1, "--warmup must be in [0, 1) (a fraction of the optimizer "
     "steps), got -0.1"),
    (_with("--warmup", "1"), 1, "--warmup must be in [0, 1) (a fraction of the optimizer steps), "
     "got 1.0"),
    (_with("--warmup", "nan"), 1, "--warmup must be in [0, 1)"),
    (_with("--schedule", "steps"), 2, "Invalid value for '--schedule': 'steps' is not one of "
     "'linear', 'cosine', 'constant'."),
    (_with("--batch-size", "0"), 1, "--batch-size must be between 1 and 4096, got 0"),
    (_with("--batch-size", "-4"), 1, "--batch-size must be between 1 and 4096, got -4"),
    (_with("--batch-size", "100000"), 1, "--batch-size must be between 1 and 4096, got 100000"),
    (_with("--grad-accum", "0"), 1, "--grad-accum must be between 1 and 4096, got 0"),
    (_with("--grad-accum", "99999999999999999999"), 1, "--grad-accum must be between 1 and "
     "4096, got 99999999999999999999"),
    (_with("--max-length", "1"), 1, "--max-length must be at least 2, got 1"),
    (_with("--max-length", "-5"), 1, "--max-length must be at least 2, got -5"),
    (_with("--max-length", "513"), 1, "--max-length 513 is longer than the context the base was "
     "trained for (512 tokens); pass at most 512"),
    (_with("--max-length", "8"), 1, "--data {d}/p.jsonl has no usable preference pair (24 lines "
     "skipped, the first, line 1: prompt of "),
    (_with("--seed", "-1"), 1, "--seed must be between 0 and 2^64 - 1, got -1"),
    (_with("--seed", str(2**64)), 1, f"--seed must be between 0 and 2^64 - 1, got {2**64}"),
    (_with("--lora-r", "0"), 1, "--lora-r must be at least 1, got 0"),
    (_with("--lora-r", "-2"), 1, "--lora-r must be at least 1, got -2"),
    (_with("--lora-r", "65"), 1, "--lora-r 65 is above the base's hidden size (64), where a rank "
     "stops adding anything; pass at most 64"),
    (_with("--lora-alpha", "0"), 1, "--lora-alpha must be a finite number in (0, 1000000], got "
     "0.0"),
    (_with("--lora-alpha", "-16"), 1, "--lora-alpha must be a finite number in (0, 1000000]"),
    (_with("--lora-alpha", "inf"), 1, "--lora-alpha must be a finite number in (0, 1000000], "
     "got inf"),
    (_with("--lora-alpha", "1e7"), 1, "--lora-alpha must be a finite number in (0, 1000000], got "
     "10000000.0"),
    (_with("--lora-dropout", "-0.1"), 1, "--lora-dropout must be in [0, 1), got -0.1"),
    (_with("--lora-dropout", "1"), 1, "--lora-dropout must be in [0, 1), got 1.0"),
    (_with("--lora-dropout", "nan"), 1, "--lora-dropout must be in [0, 1), got nan"),
    (_with("--eval-fraction", "-0.5"), 1, "--eval-fraction must be in [0, 1) (0 holds nothing "
     "out), got -0.5"),
    (_with("--eval-fraction", "1"), 1, "--eval-fraction must be in [0, 1) (0 holds nothing out), "
     "got 1.0"),
    (_with("--eval-fraction", "inf"), 1, "--eval-fraction must be in [0, 1)"),
    (_with("--save-every", "0"), 1, "--save-every must be at least 1, got 0"),
    (_with("--save-every", "-3"), 1, "--save-every must be at least 1, got -3"),
    (_with("--lora-targets", ""), 1, "--lora-targets names no module; name some of q_proj, "
     "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    (_with("--lora-targets", " , "), 1, "--lora-targets names no module"),
    (_with("--lora-targets", "q_proj,lm_head"), 1, "--lora-targets: 'lm_head' is not a module a "
     "LoRA can adapt here; the valid ones are q_proj, k_proj, v_proj, o_proj, gate_proj, "
     "up_proj, down_proj"),
    (_with("--full", "--lora-r", "4"), 1, "--lora-r sets the LoRA, which --full does not train; "
     "drop one of the two"),
    (_with(base="{d}/missing.gguf"), 1, "--base {d}/missing.gguf does not exist; pass a GGUF file "
     "or a Hugging Face model directory"),
    (_with(base="{d}/folder"), 1, "--base {d}/folder is a directory without config.json; pass a "
     "Hugging Face model directory or a GGUF file"),
    (_with(base="{d}/gpt2"), 1, "--base {d}/gpt2: architecture 'GPT2LMHeadModel' is not "
     "supported; supported: "),
    (_with(base="{d}/no_weights"), 1, "{d}/no_weights has no weights (model.safetensors, "
     "pytorch_model.bin or a sharded index)"),
    (_with(base="{d}/damaged_weights"), 1, "{d}/damaged_weights/model.safetensors is not a "
     "readable safetensors file ("),
    (_with(base="{d}/no_tokenizer"), 1, "--base {d}/no_tokenizer has no tokenizer (tokenizer.json "
     "or tokenizer.model); copy the base's tokenizer files into it"),
    (_with(base="{not_gguf}"), 1, "{not_gguf} is not a GGUF file"),
    (_with(base="{truncated}"), 1, "{truncated} is truncated: tensor "),
    (_with(base="{lora}"), 1, "--base {lora} is a LoRA adapter, not a model; pass the base model "
     "it belongs to"),
    (_with(base="{phi3}"), 1, "--base {phi3} is a 'phi3' GGUF; only llama, qwen2 GGUFs can be "
     "trained from, so pass its Hugging Face directory instead"),
    (_with(data="{d}/missing.jsonl"), 1, "--data {d}/missing.jsonl does not exist; pass a JSONL "
     "file of preference pairs"),
    (_with(data="{d}/folder"), 1, "--data {d}/folder is a directory; pass a JSONL file of "
     "preference pairs"),
    (_with(data="{d}/empty.jsonl"), 1, "--data {d}/empty.jsonl is empty; each line needs a JSON "
     'object {{"prompt", "chosen", "rejected"}}'),
    (_with(data="{d}/blank.jsonl"), 1, "--data {d}/blank.jsonl is empty"),
    (_with(data="{d}/binary.bin"), 1, "--data {d}/binary.bin is not UTF-8 text; it must be JSONL, "
     "one JSON object per line"),
    (_with(data="{d}/all_bad.jsonl"), 1, "--data {d}/all_bad.jsonl has no usable preference pair "
     "(3 lines skipped, the first, line 1: not valid JSON); each line needs "),
    (_with(out="{d}/afile"), 1, "--out {d}/afile is a file; name a folder for the checkpoints "
     "and arm.gguf"),
    (_with(out="{d}/afile/run"), 1, "--out {d}/afile/run: {d}/afile is a file, not a folder; "
     "choose another --out"),
    (_with(out="{d}/done"), 1, "--out {d}/done already holds a trained ARM ({d}/done/arm.gguf); "
     "pass --force to train again from the start, or choose another --out"),
    (_with(out="{d}/half"), 1, "--out {d}/half holds the checkpoint of an unfinished run; pass "
     "--resume to continue it, or --force to start over"),
    (_with("--resume"), 1, "--resume: no checkpoint in {d}/new/checkpoint; run without --resume "
     "to start training"),
    (_with("--resume", out="{d}/done"), 1, "--resume: the run in {d}/done is finished "
     "({d}/done/arm.gguf exists); pass --force instead to train again from the start"),
    (_with("--resume", out="{d}/other_lr"), 1, "--resume: the checkpoint in "
     "{d}/other_lr/checkpoint was made with --lr 0.01, not 0.0005; resume with the same "
     "options, or pass --force to start over"),
    (_with("--resume", out="{d}/other_data"), 1, "--resume: the checkpoint in "
     "{d}/other_data/checkpoint was made from other --data (the file's contents differ); resume "
     "with the same data, or pass --force to start over"),
    (_with("--resume", "--force", out="{d}/half"), 2, "--resume continues a run and --force "
     "starts over; pass one of them"),
    (["--data", "{d}/p.jsonl", "--out", "{d}/new"], 2, "Missing option '--base'."),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny, tokenizer):
    from safetensors.torch import save_file
    from tiny_models import TinySpec, write_tiny_model

    d = tmp_path_factory.mktemp("train-mistakes")
    data = prefs(d / "p.jsonl")
    (d / "folder").mkdir()
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    llama = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    for name in ("damaged_weights", "no_tokenizer"):
        (d / name).mkdir()
        (d / name / "config.json").write_text(llama)
    (d / "damaged_weights" / "model.safetensors").write_bytes(b"\x10\x00" + b"?" * 30)
    save_file({"model.norm.weight": torch.ones(64)}, str(d / "no_tokenizer" / "model.safetensors"))
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.jsonl").write_text("\n  \n\n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "all_bad.jsonl").write_text('not json\n[1, 2]\n{"prompt": "p", "chosen": "a"}\n')
    (d / "afile").write_text("a file, not a folder\n")
    (d / "done").mkdir()
    (d / "done" / "arm.gguf").write_bytes(b"a finished ARM")
    for name in ("half", "other_lr", "other_data"):
        (d / name / "checkpoint").mkdir(parents=True)
        (d / name / "checkpoint" / "state.pt").write_bytes(b"a checkpoint")
    settings = run_settings(TrainConfig(), tiny.base, data)
    (d / "other_lr" / "checkpoint" / "settings.json").write_text(json.dumps({**settings,
                                                                             "lr": 0.01}))
    (d / "other_data" / "checkpoint" / "settings.json").write_text(json.dumps(
        {**settings, "data_sha256": "0" * 64}))
    write_tiny_model(d / "phi3.gguf", TinySpec(architecture="phi3"), tokenizer)
    return d


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def test_every_mistake_is_one_line_a_failing_status_and_no_file_changed(workspace, tiny):
    """Each refusal: its exit status, one line `Error: ...`, no traceback, no file created or
    changed: out/ is not even made, so the base was not dequantized into it."""
    names = {"d": workspace, "base": tiny.base, "not_gguf": tiny.not_gguf, "lora": tiny.lora,
             "truncated": tiny.truncated, "phi3": workspace / "phi3.gguf"}
    before = _snapshot(workspace)
    failures = []
    for args, code, message in REFUSALS:
        args = [a.format(**names) for a in args]
        res = CliRunner().invoke(main, ["train", *args])
        lines = res.stderr.splitlines()
        expected = "Error: " + message.format(**names)
        ok = (res.exit_code == code and len(lines) == 1 and lines[0].startswith(expected)
              and res.stdout == "" and "Traceback" not in res.stderr)
        if not ok:
            failures.append(f"{args}: exit {res.exit_code}, {res.stderr!r}, expected {expected!r}")
        after = _snapshot(workspace)
        if after != before:
            failures.append(f"{args} changed {set(after) ^ set(before) or 'a file'}")
            before = after
    assert not failures, "\n".join(failures)


def test_every_option_has_a_description():
    from edge_genarm.train.cli import train

    undescribed = [p.opts[0] for p in train.params if not (getattr(p, "help", "") or "").strip()]
    assert undescribed == []
    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    for p in train.params:  # each option is shown with the start of its description
        assert " ".join(p.help.split()[:3]) in text.split(p.opts[0], 1)[1][:200], p.opts[0]
