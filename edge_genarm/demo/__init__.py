"""The demo ARMs for SmolLM2-135M-Instruct (positive.gguf, concise.gguf) and how they are made:
`python -m edge_genarm.demo.build` (prompts, sampled responses, preference pairs, training)."""
