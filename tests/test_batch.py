"""Batch generation (`generate --input/--output`) on the real demo preset: K sequences at once equal
one at a time, a real SIGKILL then --resume loses and repeats nothing, bad input is reported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from edge_genarm.batch import Item, Malformed, read_items, seed_for
from edge_genarm.cli import main
from edge_genarm.engine import ArmSpec, Engine, EngineConfig
from edge_genarm.generation import encode_prompt
from edge_genarm.llama import ContextSettings
from edge_genarm.registry import Registry

PROMPTS = ["Tell me about a rainy afternoon.", "Hi!", "What is the capital of France?",
           "Give me advice on saving money.", "Write a short note about my old bicycle.",
           "How should I feel about a noisy neighbour?", "Say yes.",
           "Share a quick story about a camping trip."]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch(tmp_path, name, *args, input_path=None):
    out = tmp_path / f"{name}.jsonl"
    input_path = input_path or write_jsonl(tmp_path / "in.jsonl",
                                           [{"id": f"p{i}", "prompt": p}
                                            for i, p in enumerate(PROMPTS)])
    res = CliRunner().invoke(main, ["generate", "--preset", "demo", "--input", str(input_path),
                                    "--output", str(out), *map(str, args)])
    return res, out


def records(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: r for r in rows}


def test_greedy_batch_of_four_equals_one_at_a_time_up_to_kernel_near_ties(tmp_path,
                                                                          demo_base):
    """K = 4 decodes several rows per llama_decode, where llama.cpp switches from ggml's
    one-row dot products to llamafile's tinyBLAS (another summation order); with 8-bit activation
    blocks a last-bit difference sometimes moves a logit by up to about 1. So the texts agree
    until a step where the two best tokens were nearly tied, never elsewhere (a row given to the
    wrong sequence, say, would diverge at once and by far)."""
    one, out1 = batch(tmp_path, "k1", "--greedy", "-n", "32", "--n-parallel", "1")
    four, out4 = batch(tmp_path, "k4", "--greedy", "-n", "32", "--n-parallel", "4")
    assert one.exit_code == 0 and four.exit_code == 0, four.stderr
    r1, r4 = records(out1), records(out4)
    assert sorted(r1) == sorted(r4) == [f"p{i}" for i in range(len(PROMPTS))]
    same = [k for k in r1 if r1[k]["tokens"] == r4[k]["tokens"]]
    assert len(same) >= 2
    reg = Registry.load()
    arms = [ArmSpec(reg.resolve(a.model), a.alpha, a.name) for a in reg.preset("demo").arms]
    with Engine.load(EngineConfig(demo_base, arms, ContextSettings(n_ctx=512))) as engine:
        for key in set(r1) - set(same):
            t1, t4 = r1[key]["tokens"], r4[key]["tokens"]
            d = next(i for i, (a, b) in enumerate(zip(t1, t4)) if a != b)
            ids = encode_prompt(engine, r1[key]["prompt"])
            seq = engine.new_sequence()
            row = engine.advance([seq], [ids + t1[:d]])
            engine.release(seq)
            margin = float(row[t1[d]] - row[t4[d]])  # this replay has noise of its own too
            assert abs(margin) < 1.0, (key, d, margin)
    rec = r4["p1"]
    assert rec["prompt"] == "Hi!" and rec["error"] is None and rec["max_tokens"] == 32
    assert rec["alphas"] == {"positive": 1.0, "concise": 0.0}
    assert rec["sampling"]["greedy"] is True and rec["seed"] == seed_for(rec["run_seed"], "p1")
    assert {r["finish_reason"] for r in r4.values()} >= {"stop", "length"}
    assert four.stderr.splitlines()[-1].startswith(f"{len(PROMPTS)} records written to {out4} "
                                                   "(0 with an error), 0 already there; ")


def test_sigkill_then_resume_gives_every_prompt_once_and_the_same_texts(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    # K = 1: each step decodes one row, so the texts cannot depend on which prompts share a batch
    args = ["--preset", "demo", "--seed", "3", "-n", "48", "--n-parallel", "1", "--input",
            str(inp)]
    full, full_out = batch(tmp_path, "full", *args[:-2], input_path=inp)
    assert full.exit_code == 0, full.stderr
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "edge_genarm", "generate", *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = out.read_text().splitlines()
    assert 2 <= len(lines) < len(PROMPTS)  # killed mid-run
    torn = '{"id": 7, "prompt": "Share a quick sto'
    with open(out, "a") as fh:  # and a record torn mid-write, as a crash can leave one
        fh.write(torn)
    res = CliRunner().invoke(main, ["generate", *args, "--output", str(out), "--resume"])
    assert res.exit_code == 0, res.stderr
    assert f"{out}: cut a torn last line ({len(torn)} bytes) left by a crash" in res.stderr
    assert f"{len(PROMPTS) - len(lines)} records written" in res.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(len(PROMPTS)))  # each exactly once
    assert {k: r["text"] for k, r in records(out).items()} == \
        {k: r["text"] for k, r in records(full_out).items()}


def test_existing_output_is_refused_without_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    res, _ = batch(tmp_path, "out", "-n", "4")
    assert res.exit_code == 1
    assert res.stderr == (f"Error: --output {out} already exists; pass --resume to continue it, "
                          "or choose another --output\n")
    assert out.read_text() == "precious\n"


def test_malformed_lines_are_named_and_a_too_long_prompt_is_recorded(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "Hi!"}\nnot json\n{"prompt": ""}\n'
                   '{"id": "a", "prompt": "again"}\n[1, 2]\n'
                   '{"prompt": "x", "messages": []}\n'
                   + json.dumps({"id": "long", "prompt": "word " * 300}) + "\n"
                   '{"id": "b", "messages": [{"role": "user", "content": "Hello"}]}\n')
    res, out = batch(tmp_path, "out", "--greedy", "-n", "8", "--ctx-size", "128",
                     input_path=inp)
    assert res.exit_code == 1
    err = res.stderr.splitlines()
    assert err[:5] == [f"{inp} line 2: not valid JSON (Expecting value); skipped",
                       f'{inp} line 3: "prompt" must be a non-empty string; skipped',
                       f'{inp} line 4: id "a" appears on an earlier line; skipped',
                       f"{inp} line 5: not a JSON object; skipped",
                       f'{inp} line 6: needs exactly one of "prompt" and "messages"; skipped']
    assert err[-1] == (f"Error: 5 malformed input lines skipped (see above); 1 prompt failed "
                       f"(see their error field in {out})")
    recs = records(out)
    assert sorted(recs) == ["a", "b", "long"]
    assert recs["long"]["text"] is None and "context holds 128" in recs["long"]["error"]
    assert recs["a"]["text"] and recs["b"]["text"] and recs["b"]["error"] is None


def test_system_leads_messages_items_that_bring_none(tmp_path):
    """--system goes before a "messages" item's turns as it does before a "prompt" item."""
    user = {"role": "user", "content": "Name a colour."}
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "prompt", "prompt": "Name a colour."}, {"id": "messages", "messages": [user]},
        {"id": "own", "messages": [{"role": "system", "content": "Answer in French."}, user]}])
    res, out = batch(tmp_path, "out", "--greedy", "-n", "8", "--n-parallel", "1",
                     "--system", "Answer in one word.", input_path=inp)
    assert res.exit_code == 0, res.stderr
    recs = records(out)
    assert recs["prompt"]["tokens"] == recs["messages"]["tokens"]
    assert recs["prompt"]["prompt_tokens"] == recs["messages"]["prompt_tokens"] != \
        recs["own"]["prompt_tokens"]


def test_text_input_and_seeds():
    items = list(read_items(Path(__file__).parent.parent / "recipes" / "demo" /
                            "held_out_prompts.txt"))
    assert len(items) == 40 and all(isinstance(i, Item) for i in items)
    assert items[0].id == 1 and items[0].prompt and items[0].messages is None
    assert seed_for(5, "a") == seed_for(5, "a") != seed_for(5, "b") != seed_for(6, "a")
    assert not any(isinstance(i, Malformed) for i in items)


def test_batch_mode_needs_both_files_and_no_prompt(tmp_path):
    for args, message in [(["--input", "x.jsonl"], "batch mode needs both --input and --output"),
                          (["--input", "a", "--output", "b", "hello"], "drop PROMPT"),
                          (["--resume", "hi"], "--resume continues a batch run")]:
        res = CliRunner().invoke(main, ["generate", *args])
        assert res.exit_code == 2 and message in res.stderr
    res = CliRunner().invoke(main, ["generate", "--input", str(tmp_path / "none.jsonl"),
                                    "--output", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1
    assert res.stderr == f"Error: --input {tmp_path / 'none.jsonl'} does not exist\n"
    assert not (tmp_path / "o.jsonl").exists()


def test_lines_carry_their_own_arms_temperature_seed_max_tokens_and_n(tmp_path):
    """A line's own settings override the command line for it alone, and its record says what
    was used; each answer equals the same settings given on the command line (K = 1, where every
    step decodes one row, as in the command-line run)."""
    rows = [{"id": "off", "prompt": "Hi!", "arms": {"positive": 0}},
            {"id": "both", "prompt": "Hi!", "arms": {"positive": 0.5, "concise": 2},
             "max_tokens": 6},
            {"id": "hot", "prompt": "Say yes.", "temperature": 0.9, "seed": 77},
            {"id": "two", "prompt": "Say yes.", "temperature": 0.9, "n": 2},
            {"id": "plain", "prompt": "Say yes."},
            {"id": "nope", "prompt": "Hi!", "arms": {"nosuch": 1}},
            {"id": "bad", "prompt": "Hi!", "temperature": "hot"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    res, out = batch(tmp_path, "lines", "--greedy", "-n", "12", "-np", "1", input_path=inp)
    assert res.exit_code == 1
    assert f'{inp} line 7: "temperature" must be a number, not "hot"; skipped' in res.stderr
    recs = records(out)
    assert recs["nope"]["error"] == ("line 6: no ARM named 'nosuch'; the ARMs are positive, "
                                     "concise")
    assert recs["two"]["error"] == "line 4: n must be between 1 and 1 (the parallel sequences), got 2"
    assert recs["off"]["alphas"] == {"positive": 0.0, "concise": 0.0}
    assert recs["both"]["alphas"] == {"positive": 0.5, "concise": 2.0}
    assert recs["both"]["max_tokens"] == 6 and recs["both"]["completion_tokens"] <= 6
    assert recs["plain"]["alphas"] == {"positive": 1.0, "concise": 0.0}
    hot = recs["hot"]
    assert hot["seed"] == 77 and hot["n"] == 1 and "answers" not in hot
    assert hot["sampling"]["temperature"] == 0.9 and hot["sampling"]["greedy"] is False
    res, out2 = batch(tmp_path, "two", "-n", "12", "-np", "2", input_path=write_jsonl(
        tmp_path / "in_two.jsonl", [rows[3]]))
    two = records(out2)["two"]
    assert res.exit_code == 0 and two["n"] == 2 and len(two["answers"]) == 2
    assert two["answers"][0]["tokens"] == two["tokens"] != two["answers"][1]["tokens"]

    def alone(*args):
        res = CliRunner().invoke(main, ["generate", "--preset", "demo", "--json", *args])
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["tokens"]

    assert recs["off"]["tokens"] == alone("--greedy", "-n", "12", "--alpha", "positive=0", "Hi!")
    assert recs["both"]["tokens"] == alone("--greedy", "-n", "6", "--alpha", "positive=0.5",
                                           "--alpha", "concise=2", "Hi!")
    assert hot["tokens"] == alone("--temperature", "0.9", "--seed", "77", "-n", "12",
                                  "Say yes.")
