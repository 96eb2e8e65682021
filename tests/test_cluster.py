"""Batch generation on a real Ray cluster: two Ray nodes on this machine (Ray's own
`ray.cluster_utils.Cluster`, each node its own raylet and one CPU), never a mock.

On the demo preset with its base dequantized to F32 in exact mode, every answer depends on its
prompt, options and seed alone, so a cluster run must equal the single-machine run token for
token, whichever worker ran a line and whatever else shared its batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import edge_genarm
from edge_genarm.cli import main
from edge_genarm.cluster.batch import prefix_shares
from edge_genarm.llama import quantize_model

SYSTEMS = ["You are a ship's cook on a long voyage. Answer every question in a single line, "
           "with a nautical word somewhere in it, and never mention the weather.",
           "You are a patient librarian who loves old maps. Answer briefly and mention a "
           "book title when you can."]
QUESTIONS = ["What should I eat today?", "Name a colour.", "What is two plus two?",
             "Tell me a short fact."]


@pytest.fixture(scope="module")
def f32(smollm2, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster") / "smollm2-f32.gguf"
    quantize_model(smollm2, path, "F32", requantize=True)
    return path


def items() -> list[dict]:
    """Two groups sharing a long system prompt, interleaved; some lines with their own arms,
    seed, temperature and n."""
    out = []
    for i, q in enumerate(QUESTIONS):
        for s in SYSTEMS:
            out.append({"messages": [{"role": "system", "content": s},
                                     {"role": "user", "content": q}]})
    out[1] |= {"arms": {"positive": 0.0, "concise": 1.0}}
    out[2] |= {"temperature": 0.9, "seed": 11, "n": 2}
    out[5] |= {"temperature": 0.7, "seed": 5}
    out[3] |= {"method": "search", "search_width": 2, "segment": "line", "greedy": False,
               "temperature": 0.8, "seed": 3}  # its candidates fork on the worker
    out[6] |= {"choice": ["aye", "nay"]}  # constraints travel to the workers as any option
    out[7] |= {"json_schema": {"type": "object", "properties": {"fact": {
        "type": "string", "maxLength": 40}}, "required": ["fact"],
        "additionalProperties": False}, "max_tokens": 40}
    return out


def test_prefix_shares_keep_lines_that_share_a_prefix_on_one_worker():
    shares = prefix_shares(items(), None, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    for group in (range(0, 8, 2), range(1, 8, 2)):  # interleaved in the input
        assert sum(any(i in s for i in group) for s in shares) == 1
    prompts = ["Write about cats", "Summarise: the war", "Write about dogs", "Summarise: a"]
    assert [sorted(s) for s in prefix_shares(prompts, None, 2)] == [[1, 3], [0, 2]]


def test_the_cluster_equals_one_machine_and_a_killed_worker_loses_nothing(ray_cluster, f32):
    """Two workers (one per node), each a continuous batch of 2; one worker's process is killed
    with SIGKILL after the first line: its lines are run by the other and by its replacement,
    and every answer still equals the single-machine one."""
    options = {"greedy": True, "max_tokens": 16}
    load = {"base": f32, "exact": True, "threads": 1, "parallel": 2}
    with edge_genarm.load("demo", **load) as model:
        alone = {c.index: c for c in model.as_completed(items(), **options)}
    with edge_genarm.load("demo", ray=True, workers=2, **load) as model:
        first = {w["pid"] for w in model.workers}
        assert len({w["node"] for w in model.workers}) == 2
        got = {}
        for c in model.as_completed(items(), **options):
            assert c.index not in got
            got[c.index] = c
            if len(got) == 1:
                os.kill(model.workers[1]["pid"], signal.SIGKILL)
        assert len(model.workers) == 2 and len({w["pid"] for w in model.workers} - first) == 1
        hi = model.generate("Hi!", **options)
        assert hi.tokens == alone_generate(f32, load, options)
        assert "".join(c.text for c in model.stream("Hi!", **options)) == hi.text
    assert sorted(got) == list(range(8))
    for i in got:
        assert got[i].error is None
        assert [r.tokens for r in got[i].results] == [r.tokens for r in alone[i].results], i
    assert got[3].results[0].usage.decoded_tokens > got[3].results[0].usage.completion_tokens
    for i in (2, 3, 5):  # the sampled lines, each with its own seed
        assert got[i].request.seed == alone[i].request.seed == items()[i]["seed"]
    assert len(got[2].results) == 2 and got[1].results[0].alphas["concise"] == 1.0
    assert got[6].results[0].text in ("aye", "nay")
    assert "fact" in got[7].results[0].parsed
    # the lines of one system prompt ran on one worker: all but its first copied the prefix
    assert sum(c.results[0].usage.cached_tokens > 20 for c in got.values()) >= 4


def alone_generate(f32, load, options) -> list[int]:
    with edge_genarm.load("demo", **load) as model:
        return model.generate("Hi!", **options).tokens


def write_input(path: Path) -> Path:
    rows = [{"id": f"q{i}"} | item for i, item in enumerate(items())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_cli_batch_on_the_cluster_resumes_after_the_driver_is_killed(ray_cluster, f32,
                                                                      tmp_path):
    """`generate --input --output --ray ADDRESS --workers 2`: the driver killed mid-run, then
    --resume: every id once, and the records equal a single-machine run's."""
    inp = write_input(tmp_path / "in.jsonl")
    common = ["generate", "--preset", "demo", "--base", str(f32), "--exact", "--threads", "1",
              "--greedy", "-n", "16", "--seed", "7", "--n-parallel", "2", "--input", str(inp)]
    single = tmp_path / "single.jsonl"
    res = CliRunner().invoke(main, [*common, "--output", str(single)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "cluster.jsonl"
    ray_args = ["--ray", ray_cluster.address, "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "edge_genarm", *common, "--output", str(out),
                             *ray_args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 2 <= written < 8
    done = subprocess.run([sys.executable, "-m", "edge_genarm", *common, "--output", str(out),
                           *ray_args, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{8 - written} records written to {out} (0 with an error), {written} already" \
        in done.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(8))
    want, got = records(single), records(out)
    for key in want:
        for field in ("tokens", "text", "seed", "alphas", "finish_reason"):
            assert got[key][field] == want[key][field], (key, field)
        assert [a["tokens"] for a in got[key].get("answers", [])] == \
            [a["tokens"] for a in want[key].get("answers", [])]


def run_cli(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter; `block_ray` makes `import ray` fail there, as it
    does without the cluster extra."""
    code = ("import sys; sys.modules['ray'] = None; " if block_ray else "") + \
        "from edge_genarm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)


def test_without_ray_the_batch_runs_and_ray_says_what_to_install(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("Hi!\nSay yes.\n")
    plain = run_cli("generate", "--preset", "demo", "-n", "4", "--input", str(inp), "--output",
                    str(tmp_path / "a.jsonl"), block_ray=True)
    assert plain.returncode == 0, plain.stderr
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
    asked = run_cli("generate", "--preset", "demo", "--input", str(inp), "--output",
                    str(tmp_path / "b.jsonl"), "--ray", block_ray=True)
    assert asked.returncode != 0 and not (tmp_path / "b.jsonl").exists()
    assert asked.stderr.strip() == ("Error: --ray needs Ray, which is not installed: "
                                    "pip install 'edge-genarm[cluster]'")
    served = run_cli("serve", "--preset", "demo", "--ray", "--replicas", "2", block_ray=True)
    assert served.returncode != 0 and served.stderr.strip() == asked.stderr.strip()


@pytest.mark.parametrize("args, message", [
    (["--ray", "127.0.0.1:1"], "Error: cannot reach the Ray cluster at 127.0.0.1:1: "
                               "Connection refused; start one with `ray start --head`, or "
                               "check the address"),
    (["--ray", "--workers", "0"], "Error: --workers must be a whole number of at least 1, "
                                  "got 0"),
    (["--workers", "2"], "Error: --workers spreads a batch over Ray actors: add --ray "
                         "[ADDRESS]"),
    (["--ray", "nowhere"], "Error: --ray nowhere: give the head node as HOST:PORT (the "
                           "address `ray start --head` prints), or ray://HOST:PORT"),
])
def test_bad_cluster_options_are_one_line(tmp_path, args, message):
    inp = tmp_path / "in.txt"
    inp.write_text("Hi!\n")
    res = run_cli("generate", "--preset", "demo", "--input", str(inp), "--output",
                  str(tmp_path / "out.jsonl"), *args)
    assert res.returncode != 0 and not (tmp_path / "out.jsonl").exists()
    assert res.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in res.stderr


def test_more_workers_than_the_cluster_has_cores_is_refused(ray_cluster, f32):
    with pytest.raises(edge_genarm.UserError, match=r"^3 workers of 1 threads need 3 CPUs and "
                       r"the Ray cluster has 2; lower --workers or --threads, or add nodes$"):
        edge_genarm.load("demo", base=f32, threads=1, ray=True, workers=3)
