"""The tokenizer a converted GGUF carries.

Contract: `Tokenizer` is the list of GGUF `tokenizer.*` fields to write plus the token texts by id.
`from_gguf(path)` copies them from a base GGUF (an ARM must share its base's tokenizer);
`from_checkpoint(dir)` builds them from tokenizer.json (byte-level BPE) or tokenizer.model
(SentencePiece) with the special tokens, merges and chat template of the directory;
`check_agree` refuses two tokenizers whose token texts differ, naming the first id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from edge_genarm.errors import ConversionError

from .checkpoint import first_line, read_json

# llama.cpp picks its pre-tokenizer regexes by name; tell the name from tokenizer.json's own
# pre-tokenizer. The digit rule is what tells these apart.
_SPLIT_PATTERNS = {
    r"\p{N}{1,3}": "llama-bpe",  # Llama 3
    r"\p{N}": "qwen2",          # Qwen2
}


@dataclass
class Tokenizer:
    fields: list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]
    tokens: list[str]
    source: str

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        for key, value, vtype, sub in self.fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)


def from_gguf(path: str | Path) -> Tokenizer:
    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), vtype, sub))
    tokens = next((v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ConversionError(f"{path} has no tokenizer (tokenizer.ggml.tokens)")
    return Tokenizer(fields, list(tokens), str(path))


def from_checkpoint(directory: str | Path) -> Tokenizer | None:
    """None when the directory has no tokenizer files."""
    directory = Path(directory)
    if (directory / "tokenizer.model").exists():
        return _sentencepiece(directory)
    if (directory / "tokenizer.json").exists():
        return _byte_level_bpe(directory)
    return None


def _byte_level_bpe(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    data = read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConversionError(f"{path} is not a byte-level BPE tokenizer; pass --tokenizer-from "
                              "BASE.gguf to take the base's tokenizer")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = (gguf.TokenType.CONTROL if added.get("special")
                              else gguf.TokenType.USER_DEFINED)
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n)]
    fields = _list_fields("gpt2", _pre_name(data, path), tokens, None, token_types)
    fields += _special_fields(directory, n, merges=True)
    return Tokenizer(fields, tokens, str(path))


def _sentencepiece(directory: Path) -> Tokenizer:
    try:
        vocab = gguf.vocab.SentencePieceVocab(directory)
    except ImportError:
        raise ConversionError("reading tokenizer.model needs sentencepiece: pip install "
                              "'edge-genarm[convert]'") from None
    tokens, scores, token_types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text.decode("utf-8", errors="replace"))
        scores.append(score)
        token_types.append(int(ttype))
    fields = _list_fields("llama", "default", tokens, scores, token_types)
    fields += _special_fields(directory, len(tokens), merges=False)
    return Tokenizer(fields, tokens, str(directory / "tokenizer.model"))


def _pre_name(data: dict, path: Path) -> str:
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    for part in parts:
        regex = (part.get("pattern") or {}).get("Regex", "")
        for digits, name in _SPLIT_PATTERNS.items():
            if part.get("type") == "Split" and digits + "|" in regex:
                return name
    raise ConversionError(f"{path} uses a pre-tokenizer this converter cannot name for llama.cpp "
                          f"({kinds}); pass --tokenizer-from BASE.gguf to take the base's tokenizer")


def _list_fields(model: str, pre: str, tokens, scores, token_types):
    V = gguf.GGUFValueType
    K = gguf.Keys.Tokenizer
    fields = [(K.MODEL, model, V.STRING, None), (K.PRE, pre, V.STRING, None),
              (K.LIST, tokens, V.ARRAY, V.STRING)]
    if scores is not None:
        fields.append((K.SCORES, scores, V.ARRAY, V.FLOAT32))
    fields.append((K.TOKEN_TYPE, token_types, V.ARRAY, V.INT32))
    return fields


def _special_fields(directory: Path, n_vocab: int, merges: bool):
    """Merges, special token ids, add-bos/eos flags and the chat template, as gguf-py reads them."""
    try:
        special = gguf.vocab.SpecialVocab(directory, load_merges=merges, n_vocab=n_vocab)
    except (ValueError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise ConversionError(f"{directory}: the tokenizer's settings do not load "
                              f"({first_line(exc)}); pass the files that save_pretrained "
                              "wrote") from None
    V = gguf.GGUFValueType
    fields = []
    if special.merges:
        fields.append((gguf.Keys.Tokenizer.MERGES, list(special.merges), V.ARRAY, V.STRING))
    for typ, tid in special.special_token_ids.items():
        fields.append((f"tokenizer.ggml.{_ID_KEYS.get(typ, typ)}_token_id", int(tid), V.UINT32,
                       None))
    for typ, value in special.add_special_token.items():
        fields.append((f"tokenizer.ggml.add_{typ}_token", bool(value), V.BOOL, None))
    if isinstance(special.chat_template, str):
        fields.append((gguf.Keys.Tokenizer.CHAT_TEMPLATE, special.chat_template, V.STRING, None))
    return fields


_ID_KEYS = {"unk": "unknown", "pad": "padding", "sep": "seperator"}


def check_agree(a: Tokenizer, b: Tokenizer) -> None:
    n = min(len(a.tokens), len(b.tokens))
    for i in range(n):
        if a.tokens[i] != b.tokens[i]:
            raise ConversionError(
                f"the tokenizers disagree at token {i}: {a.tokens[i]!r} in {a.source} but "
                f"{b.tokens[i]!r} in {b.source}; an ARM must use its base's tokenizer")
    if len(a.tokens) != len(b.tokens):
        raise ConversionError(f"the tokenizers have {len(a.tokens)} tokens ({a.source}) and "
                              f"{len(b.tokens)} tokens ({b.source}); an ARM must use its base's "
                              "tokenizer")
