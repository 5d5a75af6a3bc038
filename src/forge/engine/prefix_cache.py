"""Automatic prefix caching for the native engine: which prompt prefixes have cached K/V (torch-free).

Multi-turn conversations resend everything said so far, and many prompts share a system
prompt; without a cache every admitted request prefills its whole prompt again. This
module is the bookkeeping; the K/V themselves live in the runner's block pool
(``ModelRunner.save_blocks`` / ``load_blocks``), addressed by the ``block_id`` this
module hands out (dense ids ``0..budget-1``).

* **Blocks.** K/V are cached in blocks of ``block_size`` tokens (whole blocks only). A
  block is identified by its parent block and its own token ids — vLLM's hash chain made
  exact: the blocks form a trie whose children are keyed by their token tuples, so a hit
  is always a whole prefix from position 0 and a hash collision can never hand one prefix
  another's K/V.
* **Copied, not shared.** The engine's KV cache is one fixed slot per sequence, not pages,
  so a hit copies the cached blocks into the request's slot (a memcpy per layer), and new
  blocks are copied out of a slot into the pool. Paging would avoid the copies but would
  change every attention kernel; the copy costs far less than the prefill it saves.
* **Eviction.** The budget is a number of blocks. When it is full, the least recently
  used *leaf* (a block no cached block extends) is evicted, so a chain never has a hole.
  Using a block touches its whole chain, so a parent is never older than its children,
  and evicting leaves in LRU order drops the stalest conversation tails first while a
  shared system prompt, touched by every conversation, stays.
* **Validity.** Cached K/V belong to the weights that computed them: the engine calls
  ``clear()`` whenever weights change.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

BLOCK_SIZE = 16  # tokens per cached block (vLLM's default block size)


@dataclass(eq=False)
class Block:
    """``block_size`` tokens whose K/V sit in row ``block_id`` of the runner's block pool."""

    block_id: int
    tokens: tuple[int, ...]
    parent: Block | None
    children: dict[tuple[int, ...], Block] = field(default_factory=dict)
    last_used: int = 0
    is_cached: bool = True  # False once evicted


class PrefixCache:
    """The cached prefixes: longest-prefix match, insertion, LRU eviction under a block budget."""

    def __init__(self, budget_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.budget_blocks = budget_blocks
        self.num_hits = 0  # lookups that reused at least one block (cumulative)
        self.num_evicted_blocks = 0  # (cumulative)
        self.clear()

    def clear(self) -> None:
        """Forget every block (new weights: no cached K/V is valid any more)."""
        self._root = Block(-1, (), None)
        self.num_blocks = 0
        self._free_ids: list[int] = []
        self._next_id = 0  # ids are handed out densely, so the runner's pool grows only as far as used
        self._clock = 0
        # Heap of (last_used, serial, block) for leaf blocks. Entries go stale when a block
        # is used again, gains a child or is evicted; they are skipped when popped.
        self._leaves: list[tuple[int, int, Block]] = []
        self._serial = itertools.count()

    def match(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids[:max_tokens]``, in order;
        marks them used. The caller copies them into the request's slot before anything is
        inserted (an insertion may evict them)."""
        path = self._walk(token_ids, min(len(token_ids), max_tokens) // self.block_size)
        if path:
            self.num_hits += 1
            self._touch(path)
        return [block.block_id for block in path]

    def num_cached_blocks(self, token_ids: list[int], max_tokens: int) -> int:
        """How many blocks ``match`` would return, without marking anything used."""
        return len(self._walk(token_ids, min(len(token_ids), max_tokens) // self.block_size))

    def insert(self, token_ids: list[int]) -> list[tuple[int, int]]:
        """Cache every full block of ``token_ids`` (whose K/V are in a slot at positions
        ``0..len-1``). Returns ``(block_id, start position)`` of each block added, which the
        caller must fill from that slot; stops early when the budget holds nothing else to
        evict. Blocks already cached are only marked used."""
        num_blocks = len(token_ids) // self.block_size
        path = self._walk(token_ids, num_blocks)
        self._touch(path)  # newest now; of them only the deepest is a leaf, and it is protected below
        node = path[-1] if path else self._root
        added = []
        for index in range(len(path), num_blocks):
            block_id = self._allocate(protect=node)
            if block_id is None:
                break
            tokens = self._tokens(token_ids, index)
            child = Block(block_id, tokens, node, last_used=self._clock)
            node.children[tokens] = child
            self.num_blocks += 1
            added.append((block_id, index * self.block_size))
            node = child
        if added:
            self._push_leaf(node)  # the new leaf
        return added

    def waves(self, prompts: list[list[int]]) -> list[int]:
        """Split requests admitted together into two prefill waves (0 or 1 per prompt).

        A prompt goes to wave 1 when its first uncached block is a block an earlier wave-0
        prompt of the same batch will compute: after wave 0 is prefilled and inserted, it
        hits the cache for that prefix instead of computing it again (a shared system prompt
        on a cold cache). Chained Python hashes identify the prefixes here; a collision
        would only defer a prompt needlessly, never reuse wrong K/V, since wave 1 goes
        through ``match`` like any request.
        """
        planned: set[int] = set()
        result = []
        for prompt in prompts:
            chain = self._chain_hashes(prompt, len(prompt) // self.block_size)
            cached = self.num_cached_blocks(prompt, len(prompt) - 1)
            matchable = (len(prompt) - 1) // self.block_size
            if cached < matchable and chain[cached] in planned:
                result.append(1)
            else:
                result.append(0)
                planned.update(chain)
        return result

    def statistics(self) -> dict[str, int]:
        return {"prefix_cache_hits": self.num_hits, "prefix_cache_blocks": self.num_blocks,
                "prefix_cache_budget_blocks": self.budget_blocks, "prefix_cache_block_size": self.block_size,
                "prefix_cache_evicted_blocks": self.num_evicted_blocks}

    def _tokens(self, token_ids: list[int], index: int) -> tuple[int, ...]:
        return tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])

    def _walk(self, token_ids: list[int], num_blocks: int) -> list[Block]:
        path, node = [], self._root
        for index in range(num_blocks):
            node = node.children.get(self._tokens(token_ids, index))
            if node is None:
                break
            path.append(node)
        return path

    def _chain_hashes(self, token_ids: list[int], num_blocks: int) -> list[int]:
        chain, value = [], 0
        for index in range(num_blocks):
            value = hash((value, self._tokens(token_ids, index)))
            chain.append(value)
        return chain

    def _touch(self, path: list[Block]) -> None:
        self._clock += 1
        for block in path:
            block.last_used = self._clock
        if path and not path[-1].children:
            self._push_leaf(path[-1])

    def _push_leaf(self, block: Block) -> None:
        heapq.heappush(self._leaves, (block.last_used, next(self._serial), block))
        if len(self._leaves) > 4 * self.num_blocks + 64:  # drop stale entries now and then
            self._leaves = [(b.last_used, next(self._serial), b) for b in self._all_leaves()]
            heapq.heapify(self._leaves)

    def _all_leaves(self) -> list[Block]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            block = stack.pop()
            if block.children:
                stack.extend(block.children.values())
            else:
                leaves.append(block)
        return leaves

    def _allocate(self, protect: Block) -> int | None:
        """A free block id, evicting the LRU leaf if the budget is full; None if only
        ``protect`` (the block about to be extended) could go."""
        if self.num_blocks >= self.budget_blocks and not self._evict_one(protect):
            return None
        if self._free_ids:
            return self._free_ids.pop()
        self._next_id += 1
        return self._next_id - 1

    def _evict_one(self, protect: Block) -> bool:
        kept = []
        evicted = False
        while self._leaves and not evicted:
            entry = heapq.heappop(self._leaves)
            last_used, _, block = entry
            if not block.is_cached or block.children or block.last_used != last_used:
                continue  # stale
            if block is protect:
                kept.append(entry)
                continue
            parent = block.parent
            del parent.children[block.tokens]
            block.is_cached = False
            self.num_blocks -= 1
            self.num_evicted_blocks += 1
            self._free_ids.append(block.block_id)
            if parent is not self._root and not parent.children:
                self._push_leaf(parent)  # its last use is at least its child's: LRU order holds
            evicted = True
        for entry in kept:
            heapq.heappush(self._leaves, entry)
        return evicted
