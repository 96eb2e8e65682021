"""Ordinary mistakes with every option and argument of generate, batch, chat and models, run
through the real CLI: each ends with one line `Error: ...`, exit status 1 (2 for command-line
syntax), no traceback, and no file created or changed. (convert and train have tables of their
own in test_convert.py and test_train.py.)"""

from __future__ import annotations

import dataclasses
import re

import gguf
import llama_cpp
import pytest
from click.testing import CliRunner

from edge_genarm import memory
from edge_genarm.cli import main
from edge_genarm.engine import ArmSpec, EngineConfig
from edge_genarm.errors import UserError
from edge_genarm.llama import Context, ContextSettings, Model, _log_state

# (arguments, standard input, exit status, the start of the one line after "Error: ")
GENERATE = [
    (["--seed", "-1", "hi"], None, 1, "--seed must be between 0 and 9223372036854775807, got -1"),
    (["--threads", "-3", "hi"], None, 1, "--threads must be between 1 and 512, got -3"),
    (["--threads", "100000", "hi"], None, 1, "--threads must be between 1 and 512, got 100000"),
    (["--n-gpu-layers", "-7", "hi"], None, 1, "--n-gpu-layers must be -1 (all), 0 (none) or a "
     "number of layers, got -7"),
    (["-p", "demo", "--arm-gpu-layers", "positive=-2", "hi"], None, 1, "--arm-gpu-layers "
     "positive must be -1 (all), 0 (none) or a number of layers, got -2"),
    (["-p", "demo", "--arm-gpu-layers", "positive", "hi"], None, 1, "--arm-gpu-layers positive: "
     "write NAME=N, for example small=0"),
    (["-p", "demo", "--arm-gpu-layers", "positive=all", "hi"], None, 1, "--arm-gpu-layers "
     "positive=all: write NAME=N, for example small=0"),
    (["-p", "demo", "--arm-gpu-layers", "nosuch=0", "hi"], None, 1, "--arm-gpu-layers nosuch=0: "
     "no ARM named 'nosuch'; the ARMs are positive, concise"),
    (["--ctx-size", "0", "hi"], None, 1, "--ctx-size must be at least 16 tokens, got 0"),
    (["--ctx-size", "-5", "hi"], None, 1, "--ctx-size must be at least 16 tokens, got -5"),
    (["--ctx-size", "99999999999", "hi"], None, 1, "99999999999 KV cells (1 sequence of "
     "99999999999 tokens) are more than llama.cpp can address (2147483647); lower --ctx-size"),
    (["--kv-size", "100", "hi"], None, 1, "--kv-size must be 0 (every sequence a full "
     "context) or at least the context size (2048), got 100"),
    (["--ctx-size", "100000000", "hi"], None, 1, "a context of 100000000 tokens needs about "),
    (["--ctx-size", "abc", "hi"], None, 2, "Invalid value for '--ctx-size' / '-c': 'abc' is not "
     "a valid integer."),
    (["--max-tokens", "-1", "hi"], None, 1, "--max-tokens must be >= 0, got -1"),
    (["--temperature", "nan", "hi"], None, 1, "--temperature must be a finite number >= 0, got "
     "nan"),
    (["--temperature", "-inf", "hi"], None, 1, "--temperature must be a finite number >= 0"),
    (["--temperature", "1e308", "hi"], None, 1, "--temperature must be at most 10000 (every "
     "candidate is then about equally likely), got 1e+308"),
    (["--top-k", "-1", "hi"], None, 1, "--top-k must be >= 0 (0 turns it off), got -1"),
    (["--top-p", "nan", "hi"], None, 1, "--top-p must be in (0, 1] (1 turns it off), got nan"),
    (["--min-p", "2", "hi"], None, 1, "--min-p must be in [0, 1] (0 turns it off), got 2.0"),
    (["--presence-penalty", "3", "hi"], None, 1, "--presence-penalty must be between -2 and 2 "
     "(0 turns it off), got 3.0"),
    (["--frequency-penalty", "nan", "hi"], None, 1, "--frequency-penalty must be between -2 "
     "and 2 (0 turns it off), got nan"),
    (["--dry-multiplier", "-0.5", "hi"], None, 1, "--dry-multiplier must be a finite number >= 0 "
     "(0 turns it off), got -0.5"),
    (["--dry-multiplier", "1", "--dry-base", "0.9", "hi"], None, 1, "--dry-base must be a "
     "finite number >= 1, got 0.9"),
    (["--dry-allowed-length", "0", "hi"], None, 1, "--dry-allowed-length must be >= 1, got 0"),
    (["--dry-sequence-breaker", "", "hi"], None, 1, "--dry-sequence-breaker must be a non-empty "
     "string"),
    (["--preset", "nosuch", "hi"], None, 1, "no preset named 'nosuch'; the presets are "),
    (["--models-file", "{d}/missing.toml", "hi"], None, 1, "the models file {d}/missing.toml "
     "does not exist"),
    (["--models-file", "{d}/folder", "hi"], None, 1, "the models file {d}/folder is a directory; "
     "name a .toml file"),
    (["--models-file", "{d}/binary.bin", "hi"], None, 1, "the models file {d}/binary.bin is not "
     "UTF-8 text; it must be TOML"),
    (["--models-file", "{d}/not_toml.toml", "hi"], None, 1, "the models file {d}/not_toml.toml "
     "is not valid TOML: "),
    (["--models-file", "{d}/models_number.toml", "hi"], None, 1, "{d}/models_number.toml: models "
     "must be a table, not 3"),
    (["--models-file", "{d}/base_number.toml", "-p", "x", "hi"], None, 1, "[presets.x]: base "
     "must be a string, not 3"),
    (["--models-file", "{d}/alpha_text.toml", "-p", "x", "hi"], None, 1, "[[presets.x.arms]]: "
     "alpha must be a number, not 'hi'"),
    (["--models-file", "{d}/arm_no_model.toml", "-p", "x", "hi"], None, 1, "[[presets.x.arms]]: "
     "every ARM needs name = ... and model = ..."),
    (["--base", "{d}/folder", "hi"], None, 1, "{d}/folder is not a file; pass the path of a "
     ".gguf file"),
    (["--arm", "{d}/missing.gguf", "hi"], None, 1, "{d}/missing.gguf does not exist; check the "
     "path"),
    (["--alpha", "x", "hi"], None, 1, "--alpha x: write NAME=VALUE, for example positive=0.5"),
    (["--alpha", "nosuch=1", "hi"], None, 1, "--alpha nosuch=1: no ARM named 'nosuch'; the ARMs "
     "are none"),
    (["-n", "2", "-"], b"\xff\xfe not UTF-8", 1, "the input is not UTF-8 text; convert it to "
     "UTF-8 first"),
    (["-n", "2", "caf\udce9"], None, 1, "the input is not UTF-8 text; convert it to UTF-8 first"),
    ([], None, 2, "give a PROMPT (- reads stdin), or --input and --output"),
    # batch mode
    (["--input", "{d}/prompts.txt"], None, 2, "batch mode needs both --input and --output"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/existing.jsonl"], None, 1, "--output "
     "{d}/existing.jsonl already exists; pass --resume to continue it, or choose another"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/folder"], None, 1, "--output {d}/folder is "
     "a directory; name a file, for example {d}/folder/out.jsonl"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/nowhere/out.jsonl"], None, 1, "--output "
     "{d}/nowhere/out.jsonl: the folder {d}/nowhere does not exist; create it first"),
    (["--input", "{d}/folder", "--output", "{d}/new.jsonl"], None, 1, "--input {d}/folder is a "
     "directory; name a JSONL or text file"),
    (["--input", "{d}/missing.txt", "--output", "{d}/new.jsonl"], None, 1, "--input "
     "{d}/missing.txt does not exist"),
    (["--input", "{d}/binary.bin", "--output", "{d}/new.jsonl"], None, 1, "--input "
     "{d}/binary.bin is not UTF-8 text"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/new.jsonl", "-np", "0"], None, 1,
     "--n-parallel must be between 1 and 256, got 0"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/new.jsonl", "-np", "1000"], None, 1,
     "--n-parallel must be between 1 and 256, got 1000"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/new.jsonl", "-np", "256", "-c", "65536"],
     None, 1, "256 sequences of 65536 tokens need about "),
    (["--input", "{d}/prompts.txt", "--output", "{d}/new.jsonl", "--resume", "-c", "8"], None, 1,
     "--ctx-size must be at least 16 tokens, got 8"),
    (["--input", "{d}/prompts.txt", "--output", "{d}/new.jsonl", "hi"], None, 2, "--input takes "
     "the prompts from a file: drop PROMPT, --compare and --json"),
    (["--resume", "hi"], None, 2, "--resume continues a batch run: add --input and --output"),
]

CHAT = [
    (["--seed", "-2"], None, 1, "--seed must be between 0 and 9223372036854775807, got -2"),
    (["--ctx-size", "100000000"], None, 1, "a context of 100000000 tokens needs about "),
    (["--top-p", "0"], None, 1, "--top-p must be in (0, 1] (1 turns it off), got 0.0"),
    (["--preset", "nosuch"], None, 1, "no preset named 'nosuch'"),
    (["--models-file", "{d}/folder"], None, 1, "the models file {d}/folder is a directory"),
]

MODELS = [
    (["show", "nosuch"], None, 1, "no preset named 'nosuch'; the presets are "),
    (["pull", "nosuch"], None, 1, "no preset named 'nosuch'; the presets are "),
    (["list", "--models-file", "{d}/models_number.toml"], None, 1, "{d}/models_number.toml: "
     "models must be a table, not 3"),
    (["show"], None, 2, "Missing argument 'NAME'."),
    (["frobnicate"], None, 2, "No such command 'frobnicate'."),
]

CASES = [("generate", *c) for c in GENERATE] + [("chat", *c) for c in CHAT] + \
    [("models", *c) for c in MODELS]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistakes")
    (d / "folder").mkdir()
    (d / "prompts.txt").write_text("Say hi.\nSay bye.\n")
    (d / "existing.jsonl").write_text('{"id": 1, "text": "keep me"}\n')
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "not_toml.toml").write_text("[models\n")
    (d / "models_number.toml").write_text("models = 3\n")
    (d / "base_number.toml").write_text("[presets.x]\nbase = 3\n")
    (d / "alpha_text.toml").write_text('[presets.x]\nbase = "@smollm2"\n[[presets.x.arms]]\n'
                                       'name = "a"\nmodel = "@smollm2"\nalpha = "hi"\n')
    (d / "arm_no_model.toml").write_text('[presets.x]\nbase = "@smollm2"\n[[presets.x.arms]]\n'
                                         'name = "a"\n')
    return d


def _snapshot(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("command, args, stdin, code, message", CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}"[:60] for c in CASES])
def test_a_mistake_is_one_line_a_failing_status_and_no_file_changed(workspace, command, args,
                                                                    stdin, code, message):
    before = _snapshot(workspace)
    args = [a.format(d=workspace) for a in args]
    res = CliRunner().invoke(main, [command, *args], input=stdin)
    assert res.exit_code == code, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: " + message.format(d=workspace)), lines[0]
    assert _snapshot(workspace) == before


# GPU layers: refused by a build without GPU offload, offloaded by one with it; (command,
# arguments, standard input, the layers offloaded, the refusal after "Error: ")
GPU_LAYERS = [
    ("generate", ["--n-gpu-layers", "5", "hi"], None, 5, "--n-gpu-layers 5: this "
     "llama-cpp-python build has no GPU support; drop the option, or install a CUDA or Metal "
     "build"),
    ("generate", ["--arm", "@smollm2", "--arm-gpu-layers", "smollm2=3", "hi"], None, 3,
     "--arm-gpu-layers smollm2=3: this llama-cpp-python build has no GPU support; drop the "
     "option"),
    ("chat", ["--n-gpu-layers", "3"], b"Say hi.\n", 3, "--n-gpu-layers 3: this "
     "llama-cpp-python build has no GPU support"),
]


@pytest.mark.parametrize("command, args, stdin, layers, refusal", GPU_LAYERS,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in GPU_LAYERS])
def test_gpu_layers_are_refused_without_offload_and_offloaded_with_it(workspace, command, args,
                                                                      stdin, layers, refusal):
    """The build at hand decides which branch runs; both are real runs of the CLI."""
    before = _snapshot(workspace)
    if not llama_cpp.llama_supports_gpu_offload():
        res = CliRunner().invoke(main, [command, *args], input=stdin)
        assert res.exit_code == 1 and res.stdout == ""
        assert res.stderr.startswith("Error: " + refusal) and res.stderr.count("\n") == 1
    else:  # llama.cpp's own log (--verbose) says where the layers went; the answer shows decoding
        res = CliRunner().invoke(main, [command, "--verbose", "--greedy", "-n", "4", *args],
                                 input=stdin)
        assert res.exit_code == 0, res.stderr
        assert re.search(rf"offloaded {layers}/\d+ layers to GPU", res.stderr), res.stderr
        gpu = [float(mib) for name, mib in re.findall(r"(\S+) model buffer size =\s*([\d.]+)",
                                                       res.stderr) if not name.startswith("CPU")]
        assert gpu and min(gpu) > 0, res.stderr
        assert res.stdout.strip()
    assert _snapshot(workspace) == before


def test_chat_script_reports_a_line_that_is_not_utf8_and_answers_the_next(demo_base):
    res = CliRunner().invoke(main, ["chat", "--greedy", "-n", "3"],
                             input=b"\xff\xfe bad bytes\nSay hi.\n")
    assert res.exit_code == 1
    assert res.stderr == ("Error: the input is not UTF-8 text; convert it to UTF-8 first\n"
                          "Error: some lines of the input failed (see above)\n")
    assert res.stdout.strip()  # the second line got its reply


def _kv_bytes_by_hand(path, cells: int) -> int:
    """K and V of every layer for every cell, f16: read from the GGUF header with gguf-py."""
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    meta = lambda key: int(fields[f"{arch}.{key}"].contents())  # noqa: E731
    head_dim = meta("embedding_length") // meta("attention.head_count")
    return 2 * meta("block_count") * cells * meta("attention.head_count_kv") * head_dim * 2


def _real_context_need(model: Model, settings: ContextSettings, contexts: int) -> int:
    """What an engine of `contexts` contexts of `settings` on `model` takes, as memory.Need
    counts it, from contexts really made (allocated, not a dry run): llama.cpp's logged sizes of
    the KV cache and buffers, the KV cache also computed by hand."""
    lines: list[str] = []
    _log_state["capture"] = lines
    try:
        ctx = Context(model, settings)
    finally:
        _log_state["capture"] = None
    cells = ctx.n_cells
    ctx.close()
    text = "".join(lines)
    mib = {name: sum(float(m) for m in re.findall(rx + r" size =\s*([\d.]+) MiB", text))
           for name, rx in (("kv", "llama_kv_cache:"), ("compute", "CPU compute buffer"),
                            ("output", "CPU +output buffer"))}
    assert mib["kv"] == pytest.approx(_kv_bytes_by_hand(model.path, cells) / 2**20, abs=0.01)
    each = sum(int(v * 2**20) for v in mib.values())
    return model.path.stat().st_size + contexts * each + memory.PROCESS_RESERVE


def test_memory_check_names_settings_that_fit(demo_base):
    """The K and context size the refusal names fit, and one more does not, by what contexts
    really made report (the check prices them with llama.cpp's dry run); with a made-up amount
    of free memory, so the test means the same on any machine."""
    config = EngineConfig(demo_base, [ArmSpec(demo_base, 1.0, "arm")],
                          ContextSettings(n_ctx=2048, n_seq_max=64))
    free = 2**30
    with pytest.raises(UserError) as err:
        memory.check(config, free)
    message = str(err.value)
    assert message.startswith("64 sequences of 2048 tokens need about ")
    k = int(message.split("lower --n-parallel to ")[1].split()[0])
    n_ctx = int(message.split("--ctx-size to ")[1])
    assert 1 <= k < 64 and 16 <= n_ctx < 2048
    model = Model(demo_base)  # the ARM is the base file: its weights are loaded once
    try:
        fits = lambda **kw: _real_context_need(  # noqa: E731
            model, dataclasses.replace(config.context, **kw), contexts=2) <= free
        assert fits(n_seq_max=k) and not fits(n_seq_max=k + 1)
        assert fits(n_ctx=n_ctx) and not fits(n_ctx=n_ctx + 16)
    finally:
        model.close()
    memory.check(dataclasses.replace(config, context=ContextSettings(2048, n_seq_max=k)), free)
    # the refused size's KV caches (not allocated here): two contexts, priced by hand
    need = memory.Plan(config).need(config.context)
    assert need.kv == 2 * _kv_bytes_by_hand(demo_base, 64 * 2048)


def test_a_refused_batch_leaves_no_output_file(workspace, demo_base):
    out = workspace / "refused.jsonl"
    res = CliRunner().invoke(main, ["generate", "--preset", "demo", "--input",
                                    str(workspace / "prompts.txt"), "--output", str(out),
                                    "-np", "200", "-c", "8192"])
    assert res.exit_code == 1
    assert "lower --n-parallel to " in res.stderr
    assert not out.exists()


def test_help_shows_each_command_summary_whole():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    commands = res.stdout.split("Commands:")[1]
    assert "..." not in commands
    assert ("generate Generate an answer to PROMPT (- reads it from stdin), guided by the --arm "
            "models; or, with --input and --output, answer a whole file of prompts.") in text
