"""The demo preset's trained ARMs, and the pieces of the script that built them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edge_genarm.cli import main
from recipes.demo.build import on_topic, pairs_for, prompts
from edge_genarm.registry import Registry

PROMPT = "Tell me about a rainy afternoon."


def run(*args):
    res = CliRunner().invoke(main, ["generate", "--json", "--preset", "demo", "--greedy",
                                    "-n", 40, *map(str, args), PROMPT])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_demo_preset_has_both_arms_and_they_steer():
    preset = Registry.load().preset("demo")
    assert [(a.name, a.alpha) for a in preset.arms] == [("positive", 1.0), ("concise", 0.0)]
    default = run()
    assert default["alphas"] == {"positive": 1.0, "concise": 0.0}
    base = run("--alpha", "positive=0")
    concise = run("--alpha", "positive=0", "--alpha", "concise=2")
    assert default["tokens"] != base["tokens"]
    assert concise["tokens"] != base["tokens"]


def test_the_demo_reward_model_guides_pargs_out_of_the_box():
    """`generate --preset demo --method pargs` with no other option loads the preset's reward
    model (a LoRA of SmolLM2 with a partial-BT head, the ARMs off) and moves the answer."""
    assert Registry.load().preset("demo").reward_model == "@demo-positive-rm"
    pargs = run("--method", "pargs", "--reward-weight", "4")
    base = run("--alpha", "positive=0")
    assert (pargs["method"], pargs["reward_weight"], pargs["candidates"]) == ("pargs", 4.0, 10)
    assert pargs["alphas"] == {"positive": 0.0, "concise": 0.0}
    assert pargs["tokens"] != base["tokens"]


def test_concise_arm_makes_held_out_answers_end_sooner(tmp_path):
    """Six held-out prompts, greedy, up to 160 tokens: unguided, most answers run to the limit;
    with concise at 2 at least five of the six end by themselves, each sooner than its unguided
    counterpart, in under half the tokens in all. (Greedy answers of a 135M model can fall into
    a repetition loop after a near-tie; which one does depends on the batch's kernel order.)"""
    held = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "held_out_prompts.txt"
    prompts_file = tmp_path / "six.txt"
    prompts_file.write_text("".join(held.read_text().splitlines(keepends=True)[:6]))
    lengths = {}
    for concise in ("0", "2"):
        out = tmp_path / f"concise{concise}.jsonl"
        res = CliRunner().invoke(main, ["generate", "--preset", "demo", "--greedy", "-n", "160",
                                        "--alpha", "positive=0", "--alpha", f"concise={concise}",
                                        "--input", str(prompts_file), "--output", str(out),
                                        "--n-parallel", "6"])
        assert res.exit_code == 0, res.stderr
        records = sorted((json.loads(line) for line in out.read_text().splitlines()),
                         key=lambda r: r["id"])
        lengths[concise] = [(r["completion_tokens"], r["finish_reason"]) for r in records]
    assert sum(reason == "length" for _, reason in lengths["0"]) >= 3
    assert sum(reason == "stop" for _, reason in lengths["2"]) >= 5
    assert all(short < long for (short, why), (long, _) in zip(lengths["2"], lengths["0"])
               if why == "stop")
    assert sum(n for n, _ in lengths["2"]) < 0.5 * sum(n for n, _ in lengths["0"])


def test_held_out_prompts_are_never_trained_on():
    train, held = prompts()
    assert len(train) + len(held) == 300 and len(held) == 40
    assert not set(train) & set(held)
    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo"
    assert (demo / "prompts.txt").read_text().split("\n")[:-1] == train  # what the build wrote
    assert (demo / "held_out_prompts.txt").read_text().split("\n")[:-1] == held


class FakeAfinn:
    def score(self, text):
        return text.count("good") - text.count("bad")


def test_pairs_pick_extremes_and_stay_on_topic():
    prompt = "Tell me about baking bread."
    responses = [("Baking bread is good and good fun, warm loaves.", True),
                 ("Baking bread is bad, a bad mess every time I try it at home.", False),
                 ("Bread needs flour, water and time.", True),
                 ("Tell me more about it, what do you think?", True)]
    pairs = pairs_for(prompt, responses, FakeAfinn())
    assert pairs["positive"] == {"prompt": prompt, "chosen": responses[0][0],
                                 "rejected": responses[1][0]}
    assert pairs["concise"] == {"prompt": prompt, "chosen": responses[2][0],
                                "rejected": responses[1][0]}
    assert not on_topic(prompt, responses[3][0])  # shares only the request's words


def test_an_answer_cut_at_the_cap_is_never_the_concise_choice():
    prompt = "Tell me about baking bread."
    responses = [("Bread is a loaf, baked", False),
                 ("Bread needs flour, water and some patience, then an oven and an hour or two "
                  "of waiting before the crust is done.", True)]
    assert pairs_for(prompt, responses, FakeAfinn())["concise"] is None
