"""The benchmarks: scripts that print the figures of docs/results.md, each opening with a
`machine:` line. Run them from the repository's root as modules, `python -m benchmarks.NAME
[--help]`; tests/test_benchmarks.py runs each one's --help and a tiny run. Not installed with
edge-genarm.

    machine.py   the machine line (date, CPU, memory, load, llama.cpp build)
    scoring.py   greedy answers, decoding speed and teacher-forced log-probs for the others
    judge.py     the alignment judge (Qwen2.5 0.5B, teacher-forced)
"""
