"""What prefix routing can gain at best on bench_prefix's workload: a model of vLLM's block cache, two engines.

bench_prefix.py measures `prefix` against `least_outstanding` on real engines. This script answers the
question the measurement cannot: how far is a perfect policy from random placement on the same workload,
as a function of the KV cache size? It replays the workload (applications with their own system prompt,
one-turn questions, multi-turn conversations, shuffled the same way) one request at a time against two
model engines (`--engines`) that cache KV blocks as vLLM v1 does:

- a prompt's whole blocks of `--block` tokens are hashed as a chain; a request reuses the longest run of
  leading blocks found in the cache, at most (prompt - 1) tokens' worth (vLLM recomputes the last token);
- blocks live on in a free queue after their request ends and are evicted oldest first; a request's
  blocks are freed tail first, so a prefix loses its last blocks before its first (as vLLM's KV cache
  manager frees them in reverse order).

Policies: `random` (what least outstanding requests amounts to for prefixes: an engine picked without regard
to the prompt) and `partition` (each application, with its conversations, always on the same engine, half of
the applications on each: no spill, no re-placement, the best a prefix policy can do with applications of
equal traffic; with k engines, applications are dealt round robin). The hit rate is hit tokens / prompt
tokens, as vLLM's counters give it. What it leaves out (the real engines have it): requests in flight pin
their blocks, so the real cache holds less; the blocks an answer fills; load bounds. Its ceiling is therefore an upper
bound for the real `prefix` phase.

    python -m loadtests.sim_prefix_ceiling [--blocks 24-48] [--seeds 40] [--user-tokens 130]
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass


class BlockCache:
    """One engine's prefix cache: hashed whole blocks, evicted least recently freed first."""

    def __init__(self, capacity_blocks: int, block: int) -> None:
        self.capacity = capacity_blocks
        self.block = block
        self.free: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds; front = next evicted
        self.hit_tokens = 0
        self.prompt_tokens = 0

    def serve(self, prompt: list[int]) -> int:
        """Run one request to its end; return the prompt tokens found cached."""
        hashes: list[int] = []
        h = 0
        for i in range(len(prompt) // self.block):
            h = hash((h, tuple(prompt[i * self.block:(i + 1) * self.block])))
            hashes.append(h)
        reusable = (len(prompt) - 1) // self.block
        hit = 0
        for b in hashes[:reusable]:
            if b not in self.free:
                break
            hit += 1
        self.hit_tokens += hit * self.block
        self.prompt_tokens += len(prompt)
        for b in hashes:  # held by the running request: not evictable
            self.free.pop(b, None)
        needed = -(-len(prompt) // self.block)
        while self.free and len(self.free) + needed > self.capacity:
            self.free.popitem(last=False)
        for b in reversed(hashes):  # freed tail first: the head is evicted last
            self.free[b] = None
        return hit * self.block


@dataclass
class Workload:
    apps: int = 8
    singles: int = 10
    convs: int = 1
    turns: int = 3
    sys_tokens: int = 1032  # the system prompt and chat template, before the user's words
    question_tokens: int = 20
    user_tokens: int = 130
    answer_tokens: int = 8

    def requests(self, seed: int) -> Iterator[tuple[int, list[int]]]:
        """(application, prompt tokens) in arrival order: the items shuffled, a conversation's next turn
        queued behind the others when its answer came back (as bench_prefix's workers do)."""
        rng = random.Random(seed)
        counter = iter(range(10**9))

        def fresh(n: int) -> list[int]:
            return [next(counter) for _ in range(n)]

        prompts = [fresh(self.sys_tokens) for _ in range(self.apps)]
        queue: list[tuple[int, list[int] | None, int]] = [(a, None, 0) for a in range(self.apps)
                                                           for _ in range(self.singles)]
        queue += [(a, list(prompts[a]), self.turns) for a in range(self.apps) for _ in range(self.convs)]
        rng.shuffle(queue)
        while queue:
            app, history, turns_left = queue.pop(0)
            if history is None:
                yield app, prompts[app] + fresh(self.question_tokens)
                continue
            history += fresh(self.user_tokens)
            yield app, list(history)
            history += fresh(self.answer_tokens)
            if turns_left > 1:
                queue.append((app, history, turns_left - 1))


def hit_rate(policy: str, workload: Workload, blocks: int, block: int, seed: int, engines_n: int = 2) -> float:
    engines = [BlockCache(blocks, block) for _ in range(engines_n)]
    pick = random.Random(seed + 1)
    for app, prompt in workload.requests(seed):
        engine = engines[app % engines_n] if policy == "partition" else engines[pick.randrange(engines_n)]
        engine.serve(prompt)
    return sum(e.hit_tokens for e in engines) / sum(e.prompt_tokens for e in engines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="24-48", help="KV cache sizes per engine to try, in blocks: A-B (step 2)")
    ap.add_argument("--block", type=int, default=128, help="tokens per KV block (vLLM CPU: 128)")
    ap.add_argument("--engines", type=int, default=2, help="replicas (bench_prefix runs 2)")
    ap.add_argument("--seeds", type=int, default=40, help="workload shuffles per cache size")
    ap.add_argument("--apps", type=int, default=8)
    ap.add_argument("--singles", type=int, default=10)
    ap.add_argument("--convs", type=int, default=1)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--sys-tokens", type=int, default=1032)
    ap.add_argument("--user-tokens", type=int, default=130)
    a = ap.parse_args()
    lo_blocks, _, hi_blocks = a.blocks.partition("-")
    w = Workload(apps=a.apps, singles=a.singles, convs=a.convs, turns=a.turns, sys_tokens=a.sys_tokens,
                 user_tokens=a.user_tokens)
    print("blocks  random  partition  ratio of means  per-seed ratio p10 / p50 / p90")
    for blocks in range(int(lo_blocks), int(hi_blocks or lo_blocks) + 1, 2):
        runs = [(hit_rate("random", w, blocks, a.block, s, a.engines),
                 hit_rate("partition", w, blocks, a.block, s, a.engines))
                for s in range(a.seeds)]
        rnd = statistics.fmean(r for r, _ in runs)
        part = statistics.fmean(p for _, p in runs)
        ratios = sorted(p / r for r, p in runs)
        q = statistics.quantiles(ratios, n=10)
        print(f"{blocks:6d}  {rnd:6.1%}  {part:9.1%}  {part / rnd:14.2f}x  {q[0]:.2f} / {q[4]:.2f} / {q[8]:.2f}")


if __name__ == "__main__":
    main()
