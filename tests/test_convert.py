"""Conversion of tiny random transformers checkpoints and PEFT adapters, checked against PyTorch.

LoRA adapters are checked against PEFT itself (PeftModel.from_pretrained, merge_and_unload): the
reference side never uses the converter's own LoRA code. Bad arguments of every option are one
table, run through the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_engine, reference_log_softmax
from edge_genarm.convert.synthetic import DEFAULT_TARGETS
from edge_genarm.convert.verify import PROBES, TOLERANCE, verify
from edge_genarm.cli import main
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import Model
from hf_models import (load_peft, torch_logprobs, write_peft_adapter, write_smollm2_tokenizer,
                       write_tiny_hf_model)

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# r = 8 and alpha = 32: alpha / r = 4 but alpha / sqrt(r) = 11.3, so a scale taken from the wrong
# formula moves log-probs by far more than the tolerance
LORA = dict(rank=8, alpha=32)
MERGE_IN_PYTORCH = ("merge it in PyTorch (PEFT's merge_and_unload, then save_pretrained) and "
                    "convert that directory")


@pytest.fixture(scope="session")
def hf(tmp_path_factory, smollm2):
    d = tmp_path_factory.mktemp("hf")
    tok = write_smollm2_tokenizer(smollm2, d / "tokenizer")
    models = {
        "llama": write_tiny_hf_model(d / "llama", "llama", tok),
        "llama_tied": write_tiny_hf_model(d / "llama_tied", "llama", tok, tied=True, seed=1),
        "mistral": write_tiny_hf_model(d / "mistral", "mistral", tok, seed=2),
        "qwen2": write_tiny_hf_model(d / "qwen2", "qwen2", tok, tied=True, seed=3),
        "sharded": write_tiny_hf_model(d / "sharded", "llama", tok, seed=4, max_shard_size="4MB"),
        "pt_bin": write_tiny_hf_model(d / "pt_bin", "llama", tok, seed=5,
                                      safe_serialization=False),
        "gpt2": write_tiny_hf_model(d / "gpt2", "gpt2", tok),
        # Llama 3.1 rope scaling, with a short original context so that all three bands show
        "llama31": write_tiny_hf_model(d / "llama31", "llama", tok, seed=6, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "linear": write_tiny_hf_model(d / "linear", "llama", tok, seed=8, rope_scaling={
            "rope_type": "linear", "factor": 4.0}),
        # as many key/value heads as query heads: k_proj and v_proj of another shape
        "kv4": write_tiny_hf_model(d / "kv4", "llama", tok, seed=9,
                                   config={"num_key_value_heads": 4}),
    }
    base = models["llama"]
    models["lora"] = write_peft_adapter(base, d / "lora", ALL_TARGETS, **LORA)
    models["rslora"] = write_peft_adapter(base, d / "rslora", ALL_TARGETS, **LORA, rslora=True,
                                          seed=2)
    # Per-module ranks and alphas. layers.0's q_proj matches two alpha keys: PEFT takes the
    # first in the saved config's order, "layers.0.self_attn.q_proj" (PEFT writes keys sorted).
    models["patterns"] = write_peft_adapter(
        base, d / "patterns", ALL_TARGETS, **LORA, seed=3,
        rank_pattern={"down_proj": 2, "layers.1.self_attn.v_proj": 16},
        alpha_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 64, "o_proj": 128})
    models["lora_embed"] = write_peft_adapter(base, d / "lora_embed", ("q_proj", "embed_tokens"))
    models["dora"] = write_peft_adapter(base, d / "dora", ("q_proj", "v_proj"), use_dora=True)
    models["modules_to_save"] = write_peft_adapter(base, d / "modules_to_save", ("q_proj",),
                                                   modules_to_save=["lm_head"])
    models["lora_head"] = write_peft_adapter(base, d / "lora_head", ("q_proj", "lm_head"))
    models["tokenizer"] = tok
    return models


@pytest.fixture(scope="session")
def base_gguf(hf, tmp_path_factory):
    """The f32 GGUF of hf["llama"], the base every LoRA test applies its adapter to."""
    return converted(hf["llama"], tmp_path_factory.mktemp("base") / "base.gguf", "--outtype",
                     "f32")


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def converted(src, out, *args):
    res = run(src, "--out", out, *args)
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"wrote {out} (")
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others, as a new file would be
    return out


def llama_logprobs(ctx, ids: list[int]) -> np.ndarray:
    """Next-token log-probs of a llama.cpp context, one position at a time (float64)."""
    rows = [np.array(ctx.decode([(0, [tok], pos)])[0], dtype=np.float64)
            for pos, tok in enumerate(ids)]
    ctx.seq_remove(0)
    return np.stack([reference_log_softmax(r) for r in rows])


@pytest.mark.parametrize("name", ["llama", "llama_tied", "mistral", "qwen2", "sharded", "pt_bin",
                                  "llama31", "linear"])
def test_f32_conversion_matches_transformers(hf, tmp_path, name):
    out = converted(hf[name], tmp_path / f"{name}.gguf", "--outtype", "f32")
    report = verify(out, hf[name])
    assert report.max_abs_diff < 1e-3
    assert report.top1_agreement == 1.0
    shapes = inspect_gguf(out).shapes
    assert ("output.weight" in shapes) == (name not in ("llama_tied", "qwen2"))
    assert ("rope_freqs.weight" in shapes) == (name == "llama31")


def test_greedy_tokens_match_transformers(hf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = converted(hf["llama"], tmp_path / "m.gguf", "--outtype", "f32")
    model = AutoModelForCausalLM.from_pretrained(hf["llama"], dtype=torch.float32)
    with make_engine(out) as engine:
        ids = engine.model.tokenize("The weather today", add_special=True)
        seq = engine.new_sequence()
        scores = engine.advance([seq], [ids])
        ours = []
        for _ in range(8):
            ours.append(int(np.argmax(scores)))
            scores = engine.advance([seq], [[ours[-1]]])
    ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    assert ours == ref


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_smaller_types_stay_within_their_tolerance(hf, tmp_path, outtype):
    """The figure the tolerance bounds, verify's largest difference over the tokens PyTorch gives
    p >= 1e-4, measured again here: the file's llama.cpp log-probs against transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    out = converted(hf["llama"], tmp_path / f"{outtype}.gguf", "--outtype", outtype, "--verify")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper()  # not f32 written under another name
    model = AutoModelForCausalLM.from_pretrained(hf["llama"], dtype=torch.float32)
    likely = 0.0
    with make_engine(out) as engine:
        for text in PROBES:
            ids = engine.model.tokenize(text, add_special=True)
            ours, ref = llama_logprobs(engine.base, ids), torch_logprobs(model, ids)
            likely = max(likely, float(np.abs(ours - ref)[ref >= np.log(1e-4)].max()))
    report = verify(out, hf["llama"])
    assert report.likely_abs_diff == pytest.approx(likely, rel=1e-2, abs=1e-5)
    assert likely < TOLERANCE[outtype]


def test_quantize_through_llama_cpp(hf, tmp_path):
    f16 = converted(hf["llama"], tmp_path / "f16.gguf")
    q4 = converted(hf["llama"], tmp_path / "q4.gguf", "--quantize", "Q4_K_M")
    assert q4.stat().st_size < 0.6 * f16.stat().st_size
    assert Model(q4).meta("general.file_type") == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M


@pytest.mark.parametrize("adapter", ["lora", "rslora", "patterns"])
def test_lora_adapter_runs_in_llama_cpp_as_in_peft(hf, base_gguf, tmp_path, adapter):
    """The converted adapter on the f32 base, as an ARM runs it, against PeftModel."""
    lora = converted(hf[adapter], tmp_path / "lora.gguf", "--base", base_gguf)
    info = inspect_gguf(lora)
    assert info.is_adapter and info.adapter_type == "lora"
    assert {f"blk.{i}.{t}.weight.lora_a" for i in (0, 1) for t in DEFAULT_TARGETS} <= \
        set(info.shapes)
    reference = load_peft(hf["llama"], hf[adapter])
    with make_engine(base_gguf, [(lora, 1.0)]) as engine:
        arm = engine.arms[0]
        assert arm.kind == "lora"
        for text in PROBES:
            ids = engine.model.tokenize(text, add_special=True)
            ours, peft = llama_logprobs(arm.context, ids), torch_logprobs(reference, ids)
            assert np.abs(ours - peft).max() < 1e-3, text
            with reference.disable_adapter():
                plain = torch_logprobs(reference, ids)
            assert np.abs(peft - plain).max() > 0.1  # the adapter really changes the model
            base = llama_logprobs(engine.base, ids)
            assert np.abs(base - plain).max() < 1e-3  # and the base context runs without it


@pytest.mark.parametrize("adapter", ["lora", "rslora", "patterns"])
def test_merged_adapter_matches_peft_merge_and_unload(hf, tmp_path, adapter):
    out = converted(hf[adapter], tmp_path / "merged.gguf", "--merge", "--base-model", hf["llama"],
                    "--outtype", "f32")
    reference = load_peft(hf["llama"], hf[adapter])
    with make_engine(out) as engine:
        ids = [engine.model.tokenize(text, add_special=True) for text in PROBES]
        ours = [llama_logprobs(engine.base, i) for i in ids]
    with reference.disable_adapter():
        plain = [torch_logprobs(reference, i) for i in ids]
    merged = reference.merge_and_unload()
    for i, o, p in zip(ids, ours, plain):
        peft = torch_logprobs(merged, i)
        assert np.abs(o - peft).max() < 1e-3
        assert np.abs(peft - p).max() > 0.1  # the merge really changes the model


@pytest.mark.parametrize("how", [["--base", "BASE"], ["--merge", "--outtype", "f32"]])
def test_verify_of_an_adapter_passes_against_peft(hf, base_gguf, tmp_path, how):
    """--verify runs the adapter (or the merged model) in llama.cpp against PeftModel."""
    out = tmp_path / "arm.gguf"
    args = [base_gguf if a == "BASE" else a for a in how]
    res = run(hf["patterns"], "--out", out, "--base-model", hf["llama"], "--verify", *args)
    assert res.exit_code == 0, res.stderr
    report = res.stderr.splitlines()[-2]
    assert report.startswith("verify: ") and report.endswith("top-1 agreement 100.0%")
    likely = float(report.split("p >= 1e-4: ")[1].split(")")[0])
    assert likely < 1e-3


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("name, what", [
    ("dora", "is a DoRA adapter, which llama.cpp cannot apply and --merge cannot merge"),
    ("modules_to_save", "also trains whole modules (lm_head), which a LoRA GGUF cannot hold and "
     "--merge cannot merge"),
    ("lora_head", "adapts lm_head, which llama.cpp LoRA adapters cannot hold (embeddings and "
     "output head) and --merge cannot merge"),
])
def test_adapters_a_gguf_cannot_hold_are_refused(hf, base_gguf, tmp_path, name, what, merge):
    args = ["--merge", "--base-model", hf["llama"]] if merge else ["--base", base_gguf]
    res = run(hf[name], "--out", tmp_path / "x.gguf", *args)
    assert res.exit_code == 1
    assert res.stderr == f"Error: {hf[name]} {what}; {MERGE_IN_PYTORCH}\n"
    assert list(tmp_path.iterdir()) == []


def test_real_smollm2_tokenizer_round_trips(hf, tmp_path, smollm2):
    out = converted(hf["llama"], tmp_path / "m.gguf", "--outtype", "f32",
                    "--tokenizer-from", smollm2)
    own = converted(hf["llama"], tmp_path / "own.gguf", "--outtype", "f32")
    real = Model(smollm2)
    for path in (out, own):
        m = Model(path)
        for text in ("Hello world 12345!", "<|im_start|>user\nHi<|im_end|>", "naïve café"):
            assert m.tokenize(text, add_special=True) == real.tokenize(text, add_special=True)
        assert m.meta("tokenizer.chat_template") == real.meta("tokenizer.chat_template")
        assert [m.special_token(k) for k in ("bos", "eos")] == \
            [real.special_token(k) for k in ("bos", "eos")]
        m.close()


def test_python_dash_m_convert_has_the_same_command_and_no_top_level_package(tmp_path):
    """Run outside the checkout, so that only what is installed can be imported."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "edge_genarm.convert", "--help"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Usage: python -m edge_genarm.convert [OPTIONS] SOURCE" in res.stdout
    top = subprocess.run([sys.executable, "-c", "import convert"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert top.returncode == 1 and "No module named 'convert'" in top.stderr


def _bad_files(hf, base_gguf, d: Path, perm: Path) -> None:
    """What the table of bad arguments refers to: broken copies of good inputs."""
    (d / "out").mkdir()
    (d / "out" / "existing.gguf").write_bytes(b"GGUF an earlier conversion")
    (d / "notes.txt").write_text("just notes\n")
    (d / "empty").mkdir()
    shutil.copy(base_gguf, d / "base.gguf")
    shutil.copytree(hf["sharded"], d / "broken")
    sorted((d / "broken").glob("model-*.safetensors"))[-1].unlink()
    config = json.loads((hf["llama"] / "config.json").read_text())
    for name, file, text in (
            ("bad_json", "config.json", "{not json"), ("list_json", "config.json", "[1, 2]"),
            ("no_heads", "config.json", json.dumps({k: v for k, v in config.items()
                                                    if k != "num_attention_heads"})),
            ("bad_tokenizer", "tokenizer.json", "{not json"),
            ("bad_tokenizer_config", "tokenizer_config.json", "{not json")):
        shutil.copytree(hf["llama"], d / name)
        (d / name / file).write_text(text)
    for name, source, weights in (("truncated", "llama", "model.safetensors"),
                                  ("lora_truncated", "lora", "adapter_model.safetensors")):
        data = (hf[source] / weights).read_bytes()
        shutil.copytree(hf[source], d / name)
        (d / name / weights).write_bytes(data[: len(data) // 2])
    shutil.copytree(hf["lora"], d / "lora_bad_json")
    (d / "lora_bad_json" / "adapter_config.json").write_text("{not json")
    shutil.copytree(hf["lora"], d / "lora_hub")
    adapter_config = json.loads((hf["lora"] / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"  # a Hub name
    (d / "lora_hub" / "adapter_config.json").write_text(json.dumps(adapter_config))
    # for the rows run without root's rights: a folder one may not read, one not write in
    shutil.copytree(hf["llama"], perm / "model")
    (perm / "unreadable").mkdir()
    shutil.copy(hf["llama"] / "config.json", perm / "unreadable")
    (perm / "unreadable").chmod(0o000)
    (perm / "readonly").mkdir(mode=0o555)


def _bad_arguments(hf, tiny, smollm2, d: Path, perm: Path):
    """(arguments, a fragment of the one error line, exit status, run without root's rights)"""
    src = "pass a Hugging Face model or PEFT adapter directory"
    m, lora, kv4, base, out = hf["llama"], hf["lora"], hf["kv4"], d / "base.gguf", d / "out"
    new = ["--out", out / "new.gguf"]
    hf_dir = "pass the base's Hugging Face directory"
    return [
        # SOURCE
        ([d / "missing", *new], f"{d}/missing does not exist; {src}", 1, False),
        ([d / "notes.txt", *new], f"{d}/notes.txt is not a directory; {src}", 1, False),
        ([perm / "unreadable", *new], f"{perm}/unreadable cannot be read (permission denied); "
         f"{src} that you may read", 1, True),
        ([hf["tokenizer"], *new], f"{hf['tokenizer']} has neither config.json nor "
         f"adapter_config.json; {src}", 1, False),
        ([d / "bad_json", *new], f"{d}/bad_json/config.json is not valid JSON (", 1, False),
        ([d / "list_json", *new], f"{d}/list_json/config.json holds a JSON list, not an object",
         1, False),
        ([d / "no_heads", *new], f"{d}/no_heads/config.json lacks 'num_attention_heads'", 1,
         False),
        ([d / "bad_tokenizer", *new], f"{d}/bad_tokenizer/tokenizer.json is not valid JSON (",
         1, False),
        ([d / "bad_tokenizer_config", *new], f"{d}/bad_tokenizer_config: the tokenizer's "
         "settings do not load (", 1, False),
        ([d / "truncated", *new], f"{d}/truncated/model.safetensors is not a readable "
         "safetensors file (Error while deserializing header: ", 1, False),
        ([d / "broken", *new], "lacks 1 shard(s) that model.safetensors.index.json names: ", 1,
         False),
        ([hf["gpt2"], *new], "architecture 'GPT2LMHeadModel' is not supported; supported: "
         "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", 1, False),
        ([d / "lora_bad_json", "--base", base, *new], f"{d}/lora_bad_json/adapter_config.json "
         "is not valid JSON (", 1, False),
        ([d / "lora_truncated", "--base", base, *new], f"{d}/lora_truncated/adapter_model."
         "safetensors is not a readable safetensors file", 1, False),
        ([hf["lora_embed"], "--base", m, *new], "adapts model.embed_tokens, which llama.cpp "
         "LoRA adapters cannot hold", 1, False),
        # --out
        ([m], "Missing option '--out'", 2, False),
        ([m, "--out", out / "nowhere" / "x.gguf"], f"--out {out}/nowhere/x.gguf: the folder "
         f"{out}/nowhere does not exist; create it first or choose another --out", 1, False),
        ([m, "--out", d / "notes.txt" / "x.gguf"], f"--out {d}/notes.txt/x.gguf: the folder "
         f"{d}/notes.txt is a file, not a folder; choose another --out", 1, False),
        ([m, "--out", out], f"--out {out} is a directory; name the GGUF file to write, for "
         f"example {out}/model.gguf", 1, False),
        ([perm / "model", "--out", perm / "readonly" / "x.gguf"], f"--out {perm}/readonly/x.gguf:"
         f" cannot write in {perm}/readonly (permission denied); choose another --out", 1, True),
        ([m, "--out", out / "existing.gguf"], f"--out {out}/existing.gguf already exists; pass "
         "--force to replace it, or choose another path", 1, False),
        ([lora, "--base", base, "--out", base, "--force"], f"--out {base} is also --base; "
         "choose another path", 1, False),
        ([m, "--tokenizer-from", base, "--out", base, "--force"], f"--out {base} is also "
         "--tokenizer-from; choose another path", 1, False),
        # --outtype, --quantize
        ([m, "--outtype", "f8", *new], "Invalid value for '--outtype': 'f8' is not one of", 2,
         False),
        ([m, "--quantize", "Q9_X", *new], "--quantize Q9_X: unknown quantization type; choose "
         "one of ", 1, False),
        ([m, "--outtype", "q8_0", "--quantize", "Q4_K_M", *new], "--quantize starts from an "
         "f32, f16 or bf16 model (llama.cpp does not requantize)", 1, False),
        ([lora, "--base", base, "--quantize", "Q4_K_M", *new], f"--quantize applies to full "
         f"models, and {lora} is a LoRA adapter; add --merge to write the merged model", 1,
         False),
        # --base
        ([lora, "--base", d / "missing.gguf", *new], f"--base {d}/missing.gguf does not exist; "
         "check the path", 1, False),
        ([lora, "--base", d / "notes.txt", *new], f"--base {d}/notes.txt is not a GGUF file "
         "(it starts with b'just', not b'GGUF')", 1, False),
        ([lora, "--base", d / "empty", *new], f"--base {d}/empty has no config.json; {hf_dir}",
         1, False),
        ([lora, "--base", tiny.truncated, *new], f"--base {tiny.truncated} is truncated: "
         "tensor ", 1, False),
        ([lora, "--base", tiny.lora, *new], f"--base {tiny.lora} is a LoRA adapter; pass the "
         "GGUF of a base model", 1, False),
        ([lora, "--base", smollm2, *new], f"the adapter {lora} does not fit {smollm2}: "
         "model.layers.0.mlp.down_proj.weight is [", 1, False),
        ([lora, "--base", kv4, *new], f"the adapter {lora} does not fit {kv4}: model.layers.0."
         "self_attn.k_proj.weight is [64, 64] there but the adapter changes it as [32, 64]; "
         "pass the base it was trained on", 1, False),
        ([m, "--base", base, *new], f"--base applies to LoRA adapters, and {m} is a full model; "
         "drop --base", 1, False),
        ([lora, "--merge", "--base", m, *new], "--base applies to an adapter converted as an "
         "adapter; to --merge, name the base's Hugging Face directory with --base-model DIR", 1,
         False),
        # --merge, --base-model
        ([m, "--merge", *new], f"--merge applies to a LoRA adapter directory, and {m} is a full "
         "model (config.json); convert it without --merge", 1, False),
        ([lora, "--merge", "--base-model", d / "missing", *new], f"--base-model {d}/missing "
         f"does not exist; {hf_dir}", 1, False),
        ([lora, "--merge", "--base-model", d / "notes.txt", *new], f"--base-model "
         f"{d}/notes.txt is not a directory; {hf_dir}", 1, False),
        ([lora, "--merge", "--base-model", d / "empty", *new], f"--base-model {d}/empty has no "
         f"config.json; {hf_dir}", 1, False),
        ([lora, "--merge", "--base-model", kv4, *new], f"the adapter {lora} does not fit {kv4}: "
         "model.layers.0.self_attn.k_proj.weight is [64, 64] there", 1, False),
        ([m, "--base-model", m, *new], f"--base-model applies to LoRA adapters, and {m} is a "
         "full model; drop --base-model", 1, False),
        # --tokenizer-from
        ([m, "--tokenizer-from", d / "missing.gguf", *new], f"--tokenizer-from {d}/missing.gguf"
         " does not exist; check the path", 1, False),
        ([m, "--tokenizer-from", d / "notes.txt", *new], f"--tokenizer-from {d}/notes.txt is "
         "not a GGUF file", 1, False),
        ([m, "--tokenizer-from", tiny.lora, *new], f"--tokenizer-from {tiny.lora} is a LoRA "
         "adapter; pass the GGUF of a base model", 1, False),
        ([m, "--tokenizer-from", tiny.renamed, *new], "the tokenizers disagree at token 1000: "
         "'<<renamed>>' in", 1, False),
        ([lora, "--base", base, "--tokenizer-from", smollm2, *new], f"--tokenizer-from applies "
         f"to full models, and {lora} is a LoRA adapter", 1, False),
        # --verify
        ([d / "lora_hub", "--base", base, "--verify", *new], "--verify of an adapter needs the "
         "base's Hugging Face directory: pass --base-model DIR", 1, False),
    ]


@contextlib.contextmanager
def _without_root():
    """Root may read and write anything: run as nobody, so that permissions apply (a user who
    is not root has them applied already)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def _state(*folders: Path) -> dict:
    """Every entry under the folders, and each file's size, modification time and bytes."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            st = path.lstat()
            small = path.is_file() and st.st_size < 2**20 and os.access(path, os.R_OK)
            state[path] = None if path.is_dir() else (st.st_size, st.st_mtime_ns,
                                                      path.read_bytes() if small else None)
    return state


def test_every_bad_argument_is_refused_in_one_line_and_changes_nothing(hf, tiny, smollm2,
                                                                       base_gguf, tmp_path):
    import tempfile

    # outside pytest's private folder, so that the rows run as nobody can reach it
    perm = Path(tempfile.mkdtemp(prefix="convert-permissions-"))
    perm.chmod(0o755)
    try:
        _bad_files(hf, base_gguf, tmp_path, perm)
        for args, fragment, code, unprivileged in _bad_arguments(hf, tiny, smollm2, tmp_path,
                                                                 perm):
            before = _state(tmp_path, perm)
            with _without_root() if unprivileged else contextlib.nullcontext():
                res = run(*args)
            where = [str(a) for a in args]
            assert res.exit_code == code, (where, res.stderr)
            lines = res.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), (where, res.stderr)
            assert fragment in lines[0], (where, lines[0])
            assert res.stdout == "" and "Traceback" not in res.output
            assert res.exc_info is None or res.exc_info[0] is SystemExit, (where, res.exc_info)
            assert _state(tmp_path, perm) == before, where
    finally:
        if (perm / "unreadable").exists():
            (perm / "unreadable").chmod(0o755)
        shutil.rmtree(perm)


def test_an_existing_out_is_refused_before_any_work_and_replaced_with_force(hf, tmp_path):
    from edge_genarm.convert.cli import convert
    from edge_genarm.errors import ConversionError

    out = tmp_path / "arm.gguf"
    out.write_bytes(b"GGUF an earlier conversion")
    broken = shutil.copytree(hf["llama"], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    res = run(broken, "--out", out)
    # the refusal names --out, not the broken weights: it came before they were read
    assert res.exit_code == 1
    assert res.stderr == (f"Error: --out {out} already exists; pass --force to replace it, or "
                          "choose another path\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm.gguf", "broken"]
    # with --force, a conversion that fails keeps the earlier file as it was
    res = run(broken, "--out", out, "--force")
    assert res.exit_code == 1 and "is not a readable safetensors file" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm.gguf", "broken"]
    assert out.read_bytes() == b"GGUF an earlier conversion"
    # and one that succeeds replaces it
    converted(hf["llama"], out, "--outtype", "f32", "--force")
    assert inspect_gguf(out).kind == "model"
    # the keyword call the train command makes, force left out, refuses the same way
    kwargs = dict(source=hf["llama"], outtype="f32", quant=None, base=None, merge=False,
                  base_model=None, tokenizer_from=None, verify=False)
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert.callback(out=out, **kwargs)
    convert.callback(out=tmp_path / "again.gguf", **kwargs)
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()


def test_every_option_of_convert_is_described():
    import click

    from edge_genarm.convert.cli import convert

    res = CliRunner().invoke(main, ["convert", "--help"])
    assert res.exit_code == 0
    assert "convert [OPTIONS] SOURCE" in res.stdout
    options = [p for p in convert.params if isinstance(p, click.Option)]
    for option in options:
        assert option.help and len(option.help) > 20, option.name
        assert option.opts[0] in res.stdout
    assert "--force" in res.stdout and "Replace --out if it exists" in res.stdout


def test_real_smollm2_weights_round_trip_through_pytorch(tmp_path, smollm2):
    """The real model: its GGUF dequantized to PyTorch, converted back, equal to 1e-3."""
    from edge_genarm.convert.from_gguf import gguf_to_hf

    hf_dir = gguf_to_hf(smollm2, tmp_path / "hf")
    out = converted(hf_dir, tmp_path / "smollm2-f32.gguf", "--outtype", "f32",
                    "--tokenizer-from", smollm2)
    report = verify(out, hf_dir)
    assert report.max_abs_diff < 1e-3
    assert report.top1_agreement == 1.0
    # and the converted file decodes as the original does
    with make_engine(out) as a, make_engine(smollm2) as b:
        ids = a.model.tokenize("The capital of France is", add_special=True)
        assert int(np.argmax(a.advance([a.new_sequence()], [ids]))) == \
            int(np.argmax(b.advance([b.new_sequence()], [ids])))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_gguf_converts_back_to_the_checkpoint_it_came_from(tmp_path, hf, name):
    """HF -> GGUF (f32) -> HF gives the same tensors (q/k rows put back for llama, the q/k/v
    biases of qwen2 kept) and a config transformers loads as the same class."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edge_genarm.convert.from_gguf import gguf_to_hf

    out = converted(hf[name], tmp_path / "m.gguf", "--outtype", "f32")
    back = gguf_to_hf(out, tmp_path / "back")
    original = AutoModelForCausalLM.from_pretrained(hf[name], dtype=torch.float32).state_dict()
    restored = load_file(str(back / "model.safetensors"))
    if "lm_head.weight" not in restored:  # tied: the embedding serves both
        original.pop("lm_head.weight", None)
    assert sorted(restored) == sorted(original)
    assert any(k.endswith("q_proj.bias") for k in restored) == (name == "qwen2")
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6, msg=key)
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[name]


def test_a_lora_gguf_merges_back_into_pytorch_as_peft_applies_it(hf, base_gguf, tmp_path):
    """gguf_to_hf(base, adapter=LoRA GGUF): the adapter's delta lands on the right rows (q and k
    reordered back for llama) and the model equals PEFT's own adapter on the same base."""
    import transformers as tf

    from edge_genarm.convert.from_gguf import gguf_to_hf

    lora = converted(hf["patterns"], tmp_path / "lora.gguf", "--base", base_gguf)
    merged = tf.AutoModelForCausalLM.from_pretrained(
        gguf_to_hf(base_gguf, tmp_path / "merged", adapter=lora), dtype="float32")
    reference = load_peft(hf["llama"], hf["patterns"])
    ids = [1, 504, 3458, 6357, 282, 260, 2103, 30, 378]
    ours, peft = torch_logprobs(merged, ids), torch_logprobs(reference, ids)
    assert np.abs(ours - peft).max() < 1e-4
    with reference.disable_adapter():
        assert np.abs(torch_logprobs(reference, ids) - peft).max() > 0.1


def test_an_adapter_that_does_not_fit_is_refused_before_writing(tiny, tmp_path):
    from edge_genarm.convert.from_gguf import gguf_to_hf
    from edge_genarm.errors import ConversionError

    for adapter, message in [(tiny.arm, "is not a LoRA adapter GGUF"),
                             (tiny.lora_qwen, "is for 'qwen2' but the model is 'llama'"),
                             (tiny.lora_small, "the adapter is for another model")]:
        with pytest.raises(ConversionError, match=message):
            gguf_to_hf(tiny.base, tmp_path / "out", adapter=adapter)
        assert not (tmp_path / "out").exists()


def test_sentencepiece_llama2_style_checkpoint(tmp_path):
    """Llama 2 / Tulu 2 style: tokenizer.model (SentencePiece BPE with byte fallback)."""
    import sentencepiece as spm

    from hf_models import write_sentencepiece_llama

    src = write_sentencepiece_llama(tmp_path / "spm")
    out = converted(src, tmp_path / "spm.gguf", "--outtype", "f32")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    model = Model(out)
    for text in ("The quick brown fox", "naïve café 42", "zebra quartz ☃"):
        assert model.tokenize(text, add_special=True, parse_special=False) == \
            [sp.bos_id()] + sp.encode(text)
    model.close()
    report = verify(out, src)
    assert report.max_abs_diff < 1e-3 and report.top1_agreement == 1.0


def test_adapter_without_a_local_base_asks_for_one(hf, tmp_path):
    lora = shutil.copytree(hf["lora"], tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub name
    (lora / "adapter_config.json").write_text(json.dumps(config))
    res = run(lora, "--out", tmp_path / "x.gguf")
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {lora}: name the base it belongs to with --base BASE.gguf or "
                          "--base DIR (its base_model_name_or_path is not a local directory)\n")
    assert not (tmp_path / "x.gguf").exists()


def test_a_killed_conversion_leaves_no_file_that_looks_finished(tmp_path, smollm2):
    """SIGKILL in the middle of writing 500 MB: --out never appears, only a hidden .part."""
    import signal
    import subprocess
    import time

    from edge_genarm.convert.from_gguf import gguf_to_hf

    hf_dir = gguf_to_hf(smollm2, tmp_path / "hf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edge_genarm.convert", str(hf_dir), "--out",
                             str(out_dir / "arm.gguf"), "--outtype", "f32", "--tokenizer-from",
                             str(smollm2)], cwd=Path(__file__).parent.parent,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until tensor data is being written
        parts = list(out_dir.glob(".arm.gguf.*.part"))
        if any(p.stat().st_size > 50 * 2**20 for p in parts):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = [p.name for p in out_dir.iterdir()]
    assert "arm.gguf" not in names
    assert names and all(n.startswith(".arm.gguf.") and n.endswith(".part") for n in names)
