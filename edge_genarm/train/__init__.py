"""ARM training (PyTorch, an optional extra): preference pairs in, a GGUF ARM out.

  data.py     preference JSONL read, encoded through the base's chat template, bad lines counted
  base.py     the base checked, its tokenizer, its weights dequantized for PyTorch (out/base-hf)
  checks.py   what `train` refuses (options, --out, --resume), checked before any file changes
  trainer.py  the loss -log sigmoid(beta * (log pi(chosen) - log pi(rejected))), LoRA or full,
              schedule, checkpoints and resume, held-out accuracy
  cli.py      `edge-genarm train`
Nothing in edge_genarm's generation path imports this package.
"""
