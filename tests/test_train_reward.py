"""`edge-genarm train --objective partial-bt|full-bt`: the Bradley-Terry losses on small tensors,
and a reward model trained from the tiny GGUF base through the real CLI, its written head and
LoRA scoring in llama.cpp as the trained PyTorch model scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge_genarm.cli import main
from edge_genarm.engine import Engine, EngineConfig, RewardSpec
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import ContextSettings
from edge_genarm.reward import read_head
from edge_genarm.train.base import gguf_encoder
from edge_genarm.train.data import load_pairs
from edge_genarm.train.reward import bt_loss
from test_train import TRAIN_ARGS, prefs


def test_partial_bt_is_the_mean_over_every_prefix_the_shorter_padded():
    chosen = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.5], requires_grad=True)
    loss = bt_loss(torch, chosen, rejected, "partial-bt")
    margins = np.array([0.5, -0.5, 0.5])  # the rejected response's last reward repeats
    assert float(loss.detach()) == pytest.approx(np.mean(np.log1p(np.exp(-margins))), abs=1e-6)
    loss.backward()
    # every prefix contributes: d/dm of -log sigmoid(m) is -sigmoid(-m), each over 3 prefixes,
    # and the padded prefix counts the rejected response's last reward twice
    s = 1 / (1 + np.exp(margins))
    assert chosen.grad.numpy() == pytest.approx(-s / 3, abs=1e-6)
    assert rejected.grad.numpy() == pytest.approx([s[0] / 3, (s[1] + s[2]) / 3], abs=1e-6)


def test_full_bt_reads_only_the_whole_responses():
    chosen = torch.tensor([5.0, 1.0], requires_grad=True)
    rejected = torch.tensor([-5.0, 0.0, 3.0], requires_grad=True)
    loss = bt_loss(torch, chosen, rejected, "full-bt")
    assert float(loss.detach()) == pytest.approx(np.log1p(np.exp(2.0)), abs=1e-6)
    loss.backward()
    assert chosen.grad[0] == 0 and chosen.grad[1] != 0 and rejected.grad[:2].eq(0).all()


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("rm")
    data = prefs(d / "p.jsonl")
    res = CliRunner().invoke(main, ["train", "--base", tiny.base, "--data", data,
                                    "--out", d / "run", "--objective", "partial-bt",
                                    *TRAIN_ARGS])
    assert res.exit_code == 0, res.stderr
    return d, data, res.stderr


def test_a_partial_bt_reward_model_learns_and_runs_in_llama_cpp(trained_rm, tiny):
    """The loss falls; out/reward.gguf is a LoRA of the base with the head; llama.cpp's reward
    of every chosen and rejected answer equals the trained PyTorch model's (saved adapter and
    head), and chosen answers score above rejected ones."""
    d, data, stderr = trained_rm
    out = d / "run"
    assert sorted(p.name for p in out.glob("*.gguf")) == ["reward.gguf"]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    losses = state["result"]["losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02
    assert inspect_gguf(out / "reward.gguf").is_adapter
    head = read_head(out / "reward.gguf")
    assert head.objective == "partial-bt"
    assert np.array_equal(head.weight, state["weights"]["head.weight"].numpy().ravel())
    pairs, _ = load_pairs(data, gguf_encoder(tiny.base), 256)
    answers = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    settings = ContextSettings(n_ctx=128, n_seq_max=len(answers), exact=True)
    config = EngineConfig(tiny.base, [], settings, reward=RewardSpec(out / "reward.gguf", 1))
    with Engine.load(config) as engine:
        seqs = [engine.new_sequence() for _ in answers]
        for seq, ids in zip(seqs, answers):
            engine.extend(seq, list(ids))
        ours = engine.sequence_rewards(seqs)
    n = len(pairs)
    assert np.mean(ours[:n] > ours[n:]) >= 0.8
    torch_rewards = _torch_rewards(out, answers, state)
    assert np.abs(ours - torch_rewards).max() < 1e-3


def _torch_rewards(out, answers, state) -> np.ndarray:
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base-hf",
                                                             dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    weight, bias = state["weights"]["head.weight"], state["weights"]["head.bias"]
    rewards = []
    with torch.no_grad():
        for ids in answers:
            hidden = model.get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state
            rewards.append(float(hidden[0, -1] @ weight[0] + bias[0]))
    return np.array(rewards)
