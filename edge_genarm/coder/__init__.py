"""The coder ARM (weak to strong on Qwen2.5-Coder): its objective and the code runner.

    judge.py    documented, typed Python, scored from an answer's code blocks with `ast`
    runner.py   generated code run in a fresh interpreter: time limit, no network, a throwaway
                directory
"""
