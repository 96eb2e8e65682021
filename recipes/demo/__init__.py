"""The demo ARMs for SmolLM2-135M-Instruct and the data that made them: `build.py`."""
