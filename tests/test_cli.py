"""The real `edge-genarm` CLI through click's runner, on the real SmolLM2 model and tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from edge_genarm.cli import main
from reference import reference_llama

PROMPT = "Give me three tips for a good morning."


def cli(*args, input=None):
    return CliRunner().invoke(main, ["generate", *map(str, args)], input=input)


def cli_json(*args, input=None):
    res = cli("--json", *args, input=input)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("\n") == 1  # one line, nothing else
    return json.loads(res.stdout)


def test_json_has_every_field_and_alpha_zero_equals_llama_cpp_greedy(smollm2):
    out = cli_json("--arm", f"{smollm2}:0", "--greedy", "--exact", "-n", 24, PROMPT)
    assert set(out) == {"text", "tokens", "prompt_ids", "seed", "alphas", "method",
                        "prompt_tokens", "completion_tokens", "cached_tokens", "time_to_first_token",
                        "tokens_per_second", "finish_reason", "drafted_tokens",
                        "accepted_tokens", "error", "decoded_tokens"}
    assert out["drafted_tokens"] == out["accepted_tokens"] == 0  # no --speculative
    assert out["completion_tokens"] == len(out["tokens"]) == 24
    assert out["prompt_tokens"] == len(out["prompt_ids"]) and out["cached_tokens"] == 0
    assert out["tokens_per_second"] > 0 and out["time_to_first_token"] > 0
    llm = reference_llama(smollm2, n_ctx=2048, type_k=0, type_v=0, flash_attn=False,
                          verbose=False)
    own = []
    for token in llm.generate(out["prompt_ids"], temp=0.0, reset=True):
        own.append(token)
        if len(own) == 24:
            break
    llm.close()
    assert out["tokens"] == own


def test_chat_template_is_applied_and_raw_sends_the_prompt_as_is(smollm2):
    templated = cli_json("--greedy", "-n", 1, PROMPT)
    raw = cli_json("--greedy", "-n", 1, "--raw", PROMPT)
    system = cli_json("--greedy", "-n", 1, "--system", "You are terse.", PROMPT)
    llm = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                f"Hugging Face<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert templated["prompt_ids"] == llm.tokenize(expected.encode(), add_bos=False, special=True)
    assert raw["prompt_ids"] == llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    assert "You are terse." in llm.detokenize(system["prompt_ids"]).decode()


def test_streamed_text_equals_the_json_text_for_the_same_seed():
    args = ["--seed", 5, "-n", 30, "--temperature", 0.9, PROMPT]
    streamed = cli(*args)
    assert streamed.exit_code == 0
    assert streamed.stderr == ""  # llama.cpp's log lines stay off stderr
    assert streamed.stdout == cli_json(*args)["text"] + "\n"


def test_same_seed_same_text_other_seed_other_text():
    a = cli_json("--seed", 1, "-n", 40, "--temperature", 1.2, PROMPT)
    b = cli_json("--seed", 1, "-n", 40, "--temperature", 1.2, PROMPT)
    c = cli_json("--seed", 2, "-n", 40, "--temperature", 1.2, PROMPT)
    assert a["text"] == b["text"] and a["seed"] == 1
    assert a["text"] != c["text"]


def test_end_of_generation_token_stops_and_is_kept_in_tokens():
    out = cli_json("--greedy", "-n", 200, "Say hello.")
    assert out["finish_reason"] == "stop"
    assert out["tokens"][-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in out["text"]


def test_stop_string_cuts_the_text():
    full = cli_json("--greedy", "-n", 60, PROMPT)["text"]
    # a stop string from this CPU's own answer is sure to come; a fixed word need not, since
    # kernels differ between CPUs and the quantized model's greedy text with them
    assert len(full) >= 8, full
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = cli_json("--greedy", "-n", 60, "--stop", stop, PROMPT)
    assert cut["finish_reason"] == "stop_string"
    assert cut["text"] == full[: full.index(stop)]


def test_prompt_from_stdin():
    assert cli_json("--greedy", "-n", 5, "-", input=PROMPT)["prompt_ids"] == \
        cli_json("--greedy", "-n", 5, PROMPT)["prompt_ids"]


def test_compare_prints_base_then_guided_with_the_same_seed(smollm2_lora, smollm2):
    args = ["--arm", f"{smollm2_lora}:1.5", "--greedy", "-n", 20, PROMPT]
    res = cli("--compare", *args)
    assert res.exit_code == 0, res.stderr
    both = cli_json("--compare", *args)
    base = cli_json("--greedy", "-n", 20, PROMPT)
    guided = cli_json(*args)
    assert both["base"]["tokens"] == base["tokens"]
    assert both["guided"]["tokens"] == guided["tokens"]
    assert guided["tokens"] != base["tokens"]  # the ARM changes the answer
    assert res.stdout == (f"--- base (unguided) ---\n{base['text']}\n"
                          f"--- guided (smollm2-random-lora x 1.5) ---\n{guided['text']}\n")


def test_full_context_is_a_warning_not_a_crash():
    res = cli("--greedy", "-n", 500, "--ctx-size", 48, PROMPT)
    assert res.exit_code == 0
    assert res.stderr == ("warning: the context of 48 tokens is full, the answer stops here; "
                          "raise --ctx-size for longer answers\n")
    assert res.stdout.strip()


def test_verbose_lets_llama_cpp_log_lines_through():
    res = cli("--verbose", "--greedy", "-n", 2, PROMPT)
    assert res.exit_code == 0
    assert "llama_" in res.stderr


BAD = [
    (["--base", "{d}/missing.gguf"], "{d}/missing.gguf does not exist; check the path"),
    (["--base", "{not_gguf}"], "{not_gguf} is not a GGUF file (it starts with b'thes', not "
     "b'GGUF'); convert it with `edge-genarm convert` or pass a .gguf file"),
    (["--base", "{truncated}"], "{truncated} is truncated: tensor"),
    (["--base", "{header_cut}"], "{header_cut} is a damaged or truncated GGUF file"),
    (["--base", "{lora}"], "{lora} is a LoRA adapter, not a model: pass a full GGUF model as "
     "--base and the adapter as --arm {lora}"),
    (["--base", "{base}", "--arm", "{lora_qwen}"], "the LoRA adapter {lora_qwen} is for "
     "architecture 'qwen2' but the base {base} is 'llama'; pass the base it was trained on"),
    (["--base", "{base}", "--arm", "{lora_small}"], "the LoRA adapter {lora_small} does not fit "
     "blk.0.attn_k.weight of the base {base} (A [32, 4], B [4, 16], weight [64, 32]); pass the "
     "base it was trained on"),
    (["--base", "{base}", "--arm", "{renamed}"], "{renamed} has another vocabulary than the base "
     "{base}: token 1000 is '()' in the base and '<<renamed>>' in the ARM; an ARM must share the "
     "base's tokenizer"),
    (["--base", "{base}", "--arm", "{other_eos}"], "{other_eos} has another eos token than the "
     "base {base} (0 vs 2); an ARM must share the base's tokenizer"),
    (["--base", "{base}", "--arm", "{arm}:abc"], "--arm {arm}:abc: the weight 'abc' is not a "
     "number; write PATH:ALPHA, for example model.gguf:0.5"),
    (["--base", "{base}", "--arm", "{arm}:inf"], "--arm {arm}:inf: the weight must be a finite "
     "number, not inf"),
    (["--base", "{base}", "--arm", "{arm}:nan"], "--arm {arm}:nan: the weight must be a finite "
     "number, not nan"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0, got -0.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 turns it off), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (1 turns it off), got 1.5"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1] (0 turns it off), got 1.5"),
    (["--min-p", "-0.1"], "--min-p must be in [0, 1] (0 turns it off), got -0.1"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 turns it off), got -1"),
    (["--base", "{base}", "--raw", "--ctx-size", "16"],
     "the prompt is 17 tokens but the context holds 16; shorten the prompt or raise --ctx-size"),
]
LONG_PROMPT = " ".join(["word"] * 17)


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_clear_line_and_a_failing_exit(tiny, args, message):
    paths = {k: v for k, v in vars(tiny).items()}
    paths["d"] = tiny.dir
    res = cli(*[a.format(**paths) for a in args], LONG_PROMPT)
    assert res.exit_code == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: " + message.format(**paths))


def test_unknown_option_is_one_line_with_exit_code_2():
    res = cli("--bogus", "hi")
    assert res.exit_code == 2
    assert res.stderr == ("Error: No such option '--bogus'. (Did you mean one of: '--base', "
                          "'--verbose'?) (see 'main generate --help')\n")


def test_every_package_of_the_source_tree_is_installed_by_pyproject():
    """pyproject lists its packages by name (convert/ is mapped into the namespace): a new
    package folder that is not listed would be missing from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "edge_genarm").rglob("__init__.py")} | {"edge_genarm.convert"}
    assert listed == found and config["package-dir"] == {"edge_genarm.convert": "convert"}


def test_an_arm_given_as_model_plus_adapter(tiny):
    """`--arm MODEL+ADAPTER:ALPHA`: a LoRA of a model other than the base; its name is the
    adapter's, and it guides as the engine test shows (equal to the merged LoRA)."""
    pair = cli_json("--base", tiny.arm, "--arm", f"{tiny.base}+{tiny.lora}:0.7", "--raw",
                    "--greedy", "-n", 8, "Hello world")
    merged = cli_json("--base", tiny.arm, "--arm", f"{tiny.merged}:0.7", "--raw", "--greedy",
                      "-n", 8, "Hello world")
    assert pair["alphas"] == {"lora": 0.7} and merged["alphas"] == {"merged": 0.7}
    assert pair["tokens"] == merged["tokens"]
    res = cli("--base", tiny.arm, "--arm", f"{tiny.lora}+{tiny.lora}", "--raw", "Hello")
    assert res.exit_code == 1 and res.stderr == (
        f"Error: {tiny.lora} is a LoRA adapter; an ARM's model+adapter pair needs the full model "
        "first: MODEL.gguf+ADAPTER.gguf\n")


def test_a_base_given_as_model_plus_adapter(tiny):
    """`--base MODEL+ADAPTER`: the base runs with its LoRA (not merged), as the merged model."""
    pair = cli_json("--base", f"{tiny.base}+{tiny.lora}", "--raw", "--greedy", "-n", 8,
                    "Hello world")
    merged = cli_json("--base", tiny.merged, "--raw", "--greedy", "-n", 8, "Hello world")
    plain = cli_json("--base", tiny.base, "--raw", "--greedy", "-n", 8, "Hello world")
    assert pair["tokens"] == merged["tokens"] != plain["tokens"]
    for adapter, message in [
            (tiny.arm, f"{tiny.arm} is a full model, not a LoRA adapter; after '+' name the "
             "adapter GGUF (MODEL+ADAPTER)"),
            (tiny.lora_qwen, f"the LoRA adapter {tiny.lora_qwen} is for architecture 'qwen2' but "
             f"the base {tiny.base} is 'llama'; pass the base it was trained on"),
            (tiny.dir / "missing.gguf", f"{tiny.dir / 'missing.gguf'} does not exist; check the "
             "path")]:
        res = cli("--base", f"{tiny.base}+{adapter}", "--raw", "Hello")
        assert res.exit_code == 1 and res.stdout == ""
        assert res.stderr == f"Error: {message}\n"


def _repeats_a_4gram(tokens: list[int]) -> bool:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) < len(grams)


def test_dry_options_reach_the_sampler():
    """A greedy answer that loops, and the same with DRY on from the command line (repeats of
    3 tokens allowed, a penalty no log-prob outweighs, no breakers): no 4-gram twice."""
    args = ["--greedy", "-n", 48, "Repeat after me: the cat sat on the mat. the cat sat on the "
            "mat. the cat sat on the mat."]
    plain = cli_json(*args)
    assert _repeats_a_4gram(plain["tokens"])
    dry = cli_json("--dry-multiplier", 100, "--dry-allowed-length", 3,
                   "--dry-sequence-breaker", "none", *args)
    assert not _repeats_a_4gram(dry["tokens"]) and dry["text"] != plain["text"]


def test_sequence_breakers_read_escapes_and_none():
    from edge_genarm import fields
    from edge_genarm.sampling import DRY_BREAKERS, SamplingSettings

    def breakers(given):
        return fields.build(SamplingSettings, {"dry_sequence_breakers": given}) \
            .dry_sequence_breakers
    assert SamplingSettings().dry_sequence_breakers == DRY_BREAKERS == ("\n", ":", '"', "*")
    assert breakers(["none"]) == () == breakers("none")
    assert breakers(["\\n", "\\t", "a\\\\n", "::"]) == ("\n", "\t", "a\\n", "::")
