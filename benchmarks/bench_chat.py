"""Does a chat turn cost only its new tokens? Time to first token over a 10-turn conversation.

The demo preset with both ARMs on (positive 1, concise 0.5: three contexts stepped), greedy,
`--max-tokens` per reply. For every turn it measures, back to back on the same machine:
- *cached*: `ChatSession.reply` as `edge-genarm chat` runs it (render the conversation, tokenize,
  keep the prefix already in the KV caches, decode the rest), from the call to the first token;
- *fresh*: the same prompt decoded from an empty cache in a second engine (what a chat that
  re-reads the whole conversation every turn would pay).

    python -m benchmarks.bench_chat [--turns 10] [--max-tokens 48] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.machine import print_header
from edge_genarm.api import Model
from edge_genarm.chat import ChatSession
from edge_genarm.generation import encode_messages
from edge_genarm.options import configure

MESSAGES = ["Hi! I want to start a small garden on my balcony.",
            "Which vegetables grow well in pots?",
            "How often should I water tomatoes?", "What about herbs like basil?",
            "Is morning or evening watering better?", "How do I keep pests away without sprays?",
            "Can I grow strawberries too?", "What soil should I buy?",
            "How much sun does a balcony garden need?", "Thanks! Any last tip for a beginner?"]


def first_token_time(session: ChatSession, text: str) -> float:
    t0 = time.perf_counter()
    seen = []
    session.reply(text, on_text=lambda s: seen or seen.append(time.perf_counter()))
    return (seen[0] if seen else time.perf_counter()) - t0


def fresh_first_token_time(model: Model, session: ChatSession) -> tuple[float, int]:
    """The last turn's prompt, rendered and decoded from an empty cache, to the first token."""
    t0 = time.perf_counter()
    turns = session.turns[session.first:]
    pending = turns[-1].reply
    turns[-1].reply = ""  # the prompt as it was before the reply
    ids = encode_messages(model.engine, session.messages(turns), session.template)
    turns[-1].reply = pending
    model.generate(ids, max_tokens=1, greedy=True)
    return time.perf_counter() - t0, len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads per context (0: all cores)")
    args = ap.parse_args()
    print_header()
    config = configure("demo", {"alphas": {"positive": 1.0, "concise": 0.5}, "greedy": True,
                                "max_tokens": args.max_tokens, "seed": 0, "ctx_size": 4096,
                                "threads": args.threads or None, "parallel": 1})
    rows: list[list[tuple[int, int, float, float]]] = []
    # the fresh side decodes every prompt whole; the chat's model is loaded again for each run,
    # so that each conversation starts with empty caches
    with Model(config, share_prefixes=False) as fresh_model:
        for _ in range(args.repeats):
            with Model(config) as chat_model:
                session = ChatSession(chat_model)
                run = []
                for text in MESSAGES[:args.turns]:
                    cached = first_token_time(session, text)
                    decoded = session.last.prefilled_tokens
                    fresh, n_prompt = fresh_first_token_time(fresh_model, session)
                    run.append((n_prompt, decoded, cached, fresh))
            rows.append(run)
    print("demo preset, positive 1 + concise 0.5 (base and two LoRA ARM contexts), greedy, "
          f"{args.max_tokens} tokens per reply; median of {args.repeats} runs")
    print("| turn | prompt tokens | decoded this turn | TTFT cached ms | TTFT fresh ms |")
    print("|---|---|---|---|---|")
    cached_ms = []
    for i in range(args.turns):
        n_prompt, decoded = rows[0][i][0], rows[0][i][1]
        cached = 1000 * statistics.median(r[i][2] for r in rows)
        fresh = 1000 * statistics.median(r[i][3] for r in rows)
        cached_ms.append(cached)
        print(f"| {i + 1} | {n_prompt} | {decoded} | {cached:.0f} | {fresh:.0f} |")
    later = cached_ms[1:]
    print(f"cached TTFT over turns 2-{args.turns}: median {statistics.median(later):.0f} ms, "
          f"min {min(later):.0f}, max {max(later):.0f}; last / second turn "
          f"{later[-1] / later[0]:.2f}")


if __name__ == "__main__":
    main()
