"""SlotPrefixes: which prompt tokens each KV-cache slot holds, to reuse instead of prefill.

The slot cache keeps a request's keys and values in its slot after it ends, until a
forward writes there again; the keys and values of position p depend only on tokens
0..p. So a new prompt that begins with tokens some slot already holds (a shared system
prompt, a chat's earlier turns, the same question again) need not prefill them: the
scheduler copies those columns into the new request's slot (or keeps them, when the
slot is its own) and prefills only the rest, as SGLang's radix cache and vLLM's
automatic prefix caching do with blocks. Matching is per token, not per block.

This index knows, for each slot, the token ids whose positions 0..k-1 are in the cache
once every plan scheduled so far has run. It records prompt tokens only (a slot's
thoughts and answers are not keyed by tokens here). Its contract with the scheduler:

- ``match(prompt, exclude)``: the slot (not in ``exclude``) holding the longest prefix of
  ``prompt``, and that length, at most ``len(prompt) - 1`` (the last prompt token is
  always computed: its output state gives the first token or thought);
- ``assign(slot, tokens)``: the slot now holds ``tokens`` (a prompt's first chunks);
- ``copy(source, target, length)``: a fork or prefix copy put the source's first
  ``length`` positions into ``target``;
- ``clear()``: forget everything (after a failed step left the cache unknown).

A prefix shorter than ``MIN_REUSED_TOKENS`` is not worth taking (prompts that share
only their first token or two would trade a forward's cheapest tokens for a gathered
attention); vLLM's blocks set the same floor at 16 tokens.

It knows nothing of tensors or requests; the runner performs the copies (``PrefixCopy``
in the plan), before the step's forwards and after its fork copies.
"""

from __future__ import annotations


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n            # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slices (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


#: the shortest prefix the scheduler reuses
MIN_REUSED_TOKENS = 16


class SlotPrefixes:
    def __init__(self, num_slots: int, max_positions: int):
        self.max_positions = max_positions      # a slot never holds more (its last column is scratch)
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]

    def match(self, prompt: list[int], exclude: set[int] = frozenset()) -> tuple[int | None, int]:
        limit = len(prompt) - 1
        best_slot, best = None, 0
        if limit <= 0:
            return None, 0
        first = prompt[0]
        for slot, held in enumerate(self.tokens):
            if not held or held[0] != first or slot in exclude:
                continue
            length = common_prefix_length(held, prompt)
            if length > best:
                best_slot, best = slot, length
        return best_slot, min(best, limit)

    def held_length(self, slot: int, prompt: list[int]) -> int:
        """How much of ``prompt`` (at most all but its last token) the slot holds itself."""
        return min(common_prefix_length(self.tokens[slot], prompt), len(prompt) - 1)

    def assign(self, slot: int, tokens: list[int]) -> None:
        self.tokens[slot] = list(tokens[:self.max_positions])

    def copy(self, source: int, target: int, length: int) -> None:
        self.tokens[target] = self.tokens[source][:length]

    def clear(self) -> None:
        self.tokens = [[] for _ in self.tokens]
