"""The coder ARM (weak to strong on Qwen2.5-Coder): its build, its objective and the code runner.

    build.py    requests, sampled answers, pairs, training
    judge.py    documented, typed Python, scored from an answer's code blocks with `ast`
    runner.py   generated code run in a bubblewrap sandbox: time and memory limits, no network,
                a throwaway directory
"""
