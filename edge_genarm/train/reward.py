"""Training a scalar reward model on preference pairs: a causal LM backbone and a linear head.

Contract: `RewardNet(lm)` wraps a causal LM (PEFT-wrapped or not) and returns, for every position,
the reward of the prefix ending there: head(final-norm hidden state), the same state llama.cpp
returns with embeddings on, so the trained head runs unchanged in `edge_genarm.reward`.
`bt_loss(torch, chosen, rejected, objective)` is the Bradley-Terry loss of one pair from its
per-prefix rewards (1-D tensors over the response tokens):
- "partial-bt" (PARGS): the shorter response padded with its last (whole-response) reward, then
  the mean over every prefix length i of -log sigmoid(r_chosen[:i] - r_rejected[:i]);
- "full-bt" (ARGS, best-of-N): -log sigmoid(r(chosen) - r(rejected)) on the whole responses.
`reward_pair_loss(torch, model, batch, objective, pad_id)` computes every prefix's reward of a
batch of pairs from one forward pass per sequence and returns (mean loss, accuracy on whole
responses).
"""

from __future__ import annotations

import torch

from .data import batch_tensors


class RewardNet(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.normal_(self.head.weight, std=lm.config.hidden_size ** -0.5)
        torch.nn.init.zeros_(self.head.bias)

    def backbone(self):
        """The decoder stack (with the LoRA in it, for a PEFT model), without the LM head."""
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return inner.model

    def forward(self, ids, attention):
        hidden = self.backbone()(input_ids=ids, attention_mask=attention).last_hidden_state
        return self.head(hidden.float()).squeeze(-1)


def bt_loss(torch, chosen, rejected, objective: str):
    if objective == "full-bt":
        return -torch.nn.functional.logsigmoid(chosen[-1] - rejected[-1])
    n = max(len(chosen), len(rejected))
    pad = lambda r: torch.cat([r, r[-1:].expand(n - len(r))])  # noqa: E731
    return -torch.nn.functional.logsigmoid(pad(chosen) - pad(rejected)).mean()


def reward_pair_loss(torch, model, batch, objective: str, pad_id: int):
    ids, attention, response = batch_tensors(torch, batch, pad_id)
    rewards = model(ids, attention)
    n = len(batch)
    # response token t's hidden state scores the prefix that ends with t
    per_seq = [rewards[i][response[i]] for i in range(2 * n)]
    losses = [bt_loss(torch, per_seq[i], per_seq[n + i], objective) for i in range(n)]
    right = sum(float(per_seq[i][-1] > per_seq[n + i][-1]) for i in range(n))
    return torch.stack(losses).mean(), right / n
