"""Conversion of tiny random transformers checkpoints and PEFT adapters, checked against PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_engine
from convert.lora import Adapter
from convert.verify import TOLERANCE, torch_logprobs, verify
from edge_genarm.cli import main
from edge_genarm.gguf_file import inspect_gguf
from edge_genarm.llama import Model
from hf_models import write_peft_adapter, write_smollm2_tokenizer, write_tiny_hf_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    }
    models["lora"] = write_peft_adapter(models["llama"], d / "lora", ALL_TARGETS)
    models["rslora"] = write_peft_adapter(models["llama"], d / "rslora", ("q_proj", "k_proj",
                                          "v_proj"), rank=8, rslora=True, seed=2)
    models["lora_embed"] = write_peft_adapter(models["llama"], d / "lora_embed",
                                              ("q_proj", "embed_tokens"))
    models["tokenizer"] = tok
    return models


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def converted(src, out, *args):
    res = run(src, "--out", out, *args)
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"wrote {out} (")
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others, as a new file would be
    return out


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
    out = converted(hf["llama"], tmp_path / f"{outtype}.gguf", "--outtype", outtype, "--verify")
    report = verify(out, hf["llama"])
    assert report.likely_abs_diff < TOLERANCE[outtype]
    assert report.likely_abs_diff <= report.max_abs_diff


def test_quantize_through_llama_cpp(hf, tmp_path):
    f16 = converted(hf["llama"], tmp_path / "f16.gguf")
    q4 = converted(hf["llama"], tmp_path / "q4.gguf", "--quantize", "Q4_K_M")
    assert q4.stat().st_size < 0.6 * f16.stat().st_size
    assert Model(q4).meta("general.file_type") == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_lora_adapter_runs_in_llama_cpp_as_in_peft(hf, tmp_path, adapter):
    base = converted(hf["llama"], tmp_path / "base.gguf", "--outtype", "f32")
    lora = converted(hf[adapter], tmp_path / "lora.gguf", "--base", base)
    info = inspect_gguf(lora)
    assert info.is_adapter and info.adapter_type == "lora"
    assert "blk.0.attn_q.weight.lora_a" in info.shapes
    report = verify(lora, hf["llama"], Adapter(hf[adapter]), base_gguf=base)
    assert report.max_abs_diff < 1e-3
    plain = torch_logprobs(hf["llama"], [1, 2, 3, 4])
    adapted = torch_logprobs(hf["llama"], [1, 2, 3, 4], Adapter(hf[adapter]))
    assert np.abs(plain - adapted).max() > 0.1  # the adapter really changes the model
    with make_engine(base, [(lora, 1.0)]) as engine:
        assert engine.arms[0].kind == "lora"


def test_merged_adapter_matches_peft(hf, tmp_path):
    out = converted(hf["lora"], tmp_path / "merged.gguf", "--merge", "--base-model", hf["llama"],
                    "--outtype", "f32")
    assert verify(out, hf["llama"], Adapter(hf["lora"])).max_abs_diff < 1e-3


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


def test_python_dash_m_convert_has_the_same_command(tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0
    assert "Usage: python -m convert [OPTIONS] SOURCE" in res.stdout


def _bad(hf, tiny, d):
    return [
        ([hf["gpt2"]], "architecture 'GPT2LMHeadModel' is not supported; supported: "
         "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        ([d / "broken"], "lacks 1 shard(s) that model.safetensors.index.json names: "),
        ([hf["lora_embed"], "--base", hf["llama"]], "adapts model.embed_tokens, which llama.cpp "
         "LoRA adapters cannot hold"),
        ([hf["llama"], "--tokenizer-from", tiny.renamed], "the tokenizers disagree at token "
         "1000: '<<renamed>>' in"),
        ([hf["tokenizer"]], "has neither config.json nor adapter_config.json"),
    ]


def test_bad_input_is_refused_with_one_line_and_no_output(hf, tiny, tmp_path):
    import shutil

    shutil.copytree(hf["sharded"], tmp_path / "broken")
    shard = sorted((tmp_path / "broken").glob("model-*.safetensors"))[-1]
    shard.unlink()
    for args, message in _bad(hf, tiny, tmp_path):
        out_dir = tmp_path / "out"
        out_dir.mkdir(exist_ok=True)
        res = run(args[0], "--out", out_dir / "x.gguf", *args[1:])
        assert res.exit_code == 1, (args, res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ")
        assert message in lines[0]
        assert list(out_dir.iterdir()) == []


def test_real_smollm2_weights_round_trip_through_pytorch(tmp_path, smollm2):
    """The real model: its GGUF dequantized to PyTorch, converted back, equal to 1e-3."""
    from convert.from_gguf import gguf_to_hf

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
    import json
    import shutil

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

    from convert.from_gguf import gguf_to_hf

    hf_dir = gguf_to_hf(smollm2, tmp_path / "hf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "convert", str(hf_dir), "--out",
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
