"""Reproducible builds of what edge-genarm ships, beside the package and not installed with it.

    demo/    the demo ARMs and reward models for SmolLM2-135M-Instruct: prompts, sampled
             answers, preference pairs, training (`python -m recipes.demo.build`)
    coder/   the documented-code ARM for Qwen2.5-Coder (`python -m recipes.coder.build`), its
             objective (judge.py: documented, typed Python, scored with `ast`) and the sandboxed
             runner of generated code (runner.py) that HumanEval pass@1 uses

Run them from the repository's root; the data they write stays here, the ARMs go to the
package's source folders (edge_genarm/demo/, edge_genarm/coder/), which the wheel ships.
"""
