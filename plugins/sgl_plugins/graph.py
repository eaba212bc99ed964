"""CallGraph: prompts as a tree of shared prefixes whose leaves are generation calls.

Part of the plugin contract (with `sgl_plugins.backend`): plugins import it from here, the
front doors re-export it as `sgl_adapters.graph`.

The common currency of the three front doors (LangChain, DSPy, native SGLang programs) and the
backends. A node is a prompt segment; the prompt of a node is the concatenation of the segments
on its path from the root. A leaf is one generation call on the prompt of its node: sampling
params, an optional constraint (regex, json_schema, ebnf or choices), logprob options and
caller metadata. Backends execute a graph so that each shared node is prefilled once.

A node segment is either token ids (authoritative; `text` is then only a decoded rendering for
display) or text. Graphs built from prompts with a tokenizer hold token ids found with a radix
trie over the tokenized prompts; without a tokenizer the trie runs over characters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sgl_engine.radix_cache import common_prefix_len

if TYPE_CHECKING:
    from sgl_plugins.backend import Backend

CONSTRAINT_KEYS = ("regex", "json_schema", "ebnf", "choices")
ROOT = 0


@dataclass(frozen=True)
class Node:
    """A prompt segment hanging under `parent` (None only for the root)."""

    id: int
    parent: int | None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Leaf:
    """One generation call on the prompt of `node`.

    `sampling_params` uses SGLang's names (max_new_tokens, temperature, stop, ...) without the
    constraint keys, which live in their own fields; at most one constraint is set.
    """

    id: int
    node: int
    sampling_params: Mapping[str, Any] = field(default_factory=dict)
    regex: str | None = None
    json_schema: str | Mapping[str, Any] | None = None
    ebnf: str | None = None
    choices: tuple[str, ...] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    return_text_in_logprobs: bool = False
    """Logprob entries carry each token's text as a third item (SGLang's option)."""

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """The (kind, value) of the constraint, or None."""
        for key in CONSTRAINT_KEYS:
            value = getattr(self, key)
            if value is not None:
                return key, value
        return None

    def request_params(self) -> dict[str, Any]:
        """The SGLang sampling params of this call, constraint included (a new dict)."""
        params = dict(self.sampling_params)
        constraint = self.constraint
        if constraint is not None:
            key, value = constraint
            params[key] = list(value) if key == "choices" else value
        return params


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class LeafResult:
    """The outcome of one leaf: `finish_reason` is "stop", "length" or "abort" (see `error`).

    `logprobs` holds one logprob per output token when the leaf asked for them; `meta_info` is
    the backend's raw SGLang-style meta info (top logprobs, input logprobs, latency).
    """

    leaf_id: int
    text: str
    output_ids: tuple[int, ...] = ()
    finish_reason: str = "stop"
    usage: Usage = Usage()
    matched_stop: int | str | None = None
    logprobs: tuple[float, ...] | None = None
    error: str | None = None
    meta_info: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SharedPrefix:
    """A node whose prompt is shared by `num_leaves` >= 2 leaves (for inspection)."""

    node: int
    depth: int
    text: str
    num_tokens: int | None
    num_leaves: int


class CallGraph:
    """A tree of prompt segments with generation leaves. Mutated only by `add_node`/`add_leaf`
    (not thread-safe while being built; read-only once handed to a backend)."""

    root = ROOT

    def __init__(self) -> None:
        self._nodes: list[Node] = [Node(ROOT, None, text="", token_ids=None)]
        self._children: list[list[int]] = [[]]
        self._node_leaves: list[list[int]] = [[]]
        self._leaves: list[Leaf] = []

    # -- building ---------------------------------------------------------------------------

    def add_node(
        self, parent: int, text: str | None = None, *, token_ids: Sequence[int] | None = None
    ) -> int:
        """Append a segment under `parent`; returns the new node's id."""
        self._check_node(parent)
        if text is None and token_ids is None:
            raise ValueError("a node needs text or token_ids")
        ids = None if token_ids is None else tuple(int(t) for t in token_ids)
        node = Node(len(self._nodes), parent, text=text, token_ids=ids)
        self._nodes.append(node)
        self._children.append([])
        self._node_leaves.append([])
        self._children[parent].append(node.id)
        return node.id

    def add_leaf(
        self,
        node: int,
        sampling_params: Mapping[str, Any] | None = None,
        *,
        regex: str | None = None,
        json_schema: str | Mapping[str, Any] | None = None,
        ebnf: str | None = None,
        choices: Sequence[str] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        metadata: Mapping[str, Any] | None = None,
        return_text_in_logprobs: bool = False,
    ) -> int:
        """Add a generation call on the prompt of `node`; returns the leaf id.

        Constraint keys found in `sampling_params` are moved to their fields; giving two
        constraints (or the same one twice) raises ValueError.
        """
        self._check_node(node)
        params = dict(sampling_params or {})
        given = {"regex": regex, "json_schema": json_schema, "ebnf": ebnf, "choices": choices}
        for key in CONSTRAINT_KEYS:
            if params.get(key) is not None:
                if given[key] is not None:
                    raise ValueError(f"{key} given both in sampling_params and as an argument")
                given[key] = params.pop(key)
            params.pop(key, None)
        set_keys = [k for k, v in given.items() if v is not None]
        if len(set_keys) > 1:
            raise ValueError(f"at most one constraint per leaf, got {', '.join(set_keys)}")
        if params.get("n", 1) != 1:
            raise ValueError("n > 1 is not a leaf option: add n leaves to the same node instead")
        params.pop("n", None)
        if given["choices"] is not None:
            given["choices"] = tuple(given["choices"])
            if not given["choices"]:
                raise ValueError("choices must not be empty")
        leaf = Leaf(
            id=len(self._leaves),
            node=node,
            sampling_params=params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            metadata=dict(metadata or {}),
            return_text_in_logprobs=return_text_in_logprobs,
            **given,
        )
        self._leaves.append(leaf)
        self._node_leaves[node].append(leaf.id)
        return leaf.id

    @classmethod
    def from_prompts(
        cls,
        prompts: Sequence[str | Sequence[int]],
        tokenizer: Any = None,
        sampling_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        **leaf_fields: Any,
    ) -> CallGraph:
        """One leaf per prompt (leaf i is prompt i), shared prefixes found with a radix trie.

        String prompts are tokenized with `tokenizer.encode` when a tokenizer is given (nodes
        then hold token ids), else the trie runs over characters. Token-id prompts are used as
        they are. `sampling_params` is one dict for all leaves or one per prompt; other keyword
        arguments go to every `add_leaf` call.
        """
        per_leaf = _per_prompt_params(sampling_params, len(prompts))
        seqs, kind = _sequences(prompts, tokenizer)
        graph = cls()
        ends = _insert_trie(graph, seqs, kind, tokenizer)
        for node, params in zip(ends, per_leaf, strict=True):
            graph.add_leaf(node, params, **leaf_fields)
        return graph

    @classmethod
    def from_messages(
        cls,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        backend: Backend,
        sampling_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **leaf_fields: Any,
    ) -> CallGraph:
        """One leaf per chat (a list of {"role", "content"} messages), rendered with the
        backend's chat template and tokenized with its tokenizer (characters if it has none)."""
        prompts = [
            backend.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=tools,
            )
            for messages in conversations
        ]
        return cls.from_prompts(prompts, backend.tokenizer, sampling_params, **leaf_fields)

    # -- reading ----------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        return tuple(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)

    def node(self, node_id: int) -> Node:
        self._check_node(node_id)
        return self._nodes[node_id]

    def leaf(self, leaf_id: int) -> Leaf:
        return self._leaves[leaf_id]

    def children(self, node_id: int) -> tuple[int, ...]:
        self._check_node(node_id)
        return tuple(self._children[node_id])

    def leaves_at(self, node_id: int) -> tuple[int, ...]:
        """Ids of the leaves attached directly to `node_id`."""
        self._check_node(node_id)
        return tuple(self._node_leaves[node_id])

    def path(self, node_id: int) -> list[Node]:
        """The nodes from the root (excluded) down to `node_id` (included)."""
        self._check_node(node_id)
        out: list[Node] = []
        while node_id != ROOT:
            node = self._nodes[node_id]
            out.append(node)
            node_id = node.parent
        return out[::-1]

    def subtree_leaf_count(self) -> list[int]:
        """Number of leaves under each node (indexed by node id)."""
        counts = [len(ls) for ls in self._node_leaves]
        for node in reversed(self._nodes[1:]):
            counts[node.parent] += counts[node.id]
        return counts

    def uses_token_ids(self, node_id: int) -> bool:
        return any(n.token_ids is not None for n in self.path(node_id))

    def prompt_text(self, node_id: int, tokenizer: Any = None) -> str:
        """The prompt of `node_id` as text; token segments are decoded as a whole with
        `tokenizer` when given, else joined from their display text."""
        path = self.path(node_id)
        if tokenizer is not None and any(n.token_ids is not None for n in path):
            return tokenizer.decode(self.prompt_ids(node_id, tokenizer))
        return "".join(n.text or "" for n in path)

    def prompt_ids(self, node_id: int, tokenizer: Any = None) -> list[int]:
        """The prompt of `node_id` as token ids; text segments are encoded with `tokenizer`
        (special tokens added for the first segment only)."""
        ids: list[int] = []
        for i, node in enumerate(self.path(node_id)):
            if node.token_ids is not None:
                ids.extend(node.token_ids)
            elif tokenizer is None:
                raise ValueError(f"node {node.id} is text; a tokenizer is needed to get token ids")
            else:
                ids.extend(tokenizer.encode(node.text, add_special_tokens=i == 0))
        return ids

    def leaf_inputs(
        self, tokenizer: Any = None
    ) -> tuple[Literal["text"], list[str]] | tuple[Literal["ids"], list[list[int]]]:
        """The prompts of all leaves in leaf order, all text when every segment is text, else
        all token ids (text segments encoded with `tokenizer`)."""
        if any(self.uses_token_ids(leaf.node) for leaf in self._leaves):
            return "ids", [self.prompt_ids(leaf.node, tokenizer) for leaf in self._leaves]
        return "text", [self.prompt_text(leaf.node) for leaf in self._leaves]

    def shared_prefixes(self) -> list[SharedPrefix]:
        """Non-root nodes under which two or more leaves hang, parents before children."""
        counts = self.subtree_leaf_count()
        out = []
        for node in self._nodes[1:]:
            if counts[node.id] < 2:
                continue
            path = self.path(node.id)
            tokens = (
                sum(len(n.token_ids) for n in path)
                if all(n.token_ids is not None for n in path)
                else None
            )
            text = "".join(n.text or "" for n in path)
            out.append(SharedPrefix(node.id, len(path), text, tokens, counts[node.id]))
        return out

    def shared_prefix_waves(self) -> list[list[int]]:
        """Shared nodes to warm before the leaves, in waves: a node's shared ancestors are in
        earlier waves. Only the deepest shared node of each unary chain is kept."""
        counts = self.subtree_leaf_count()
        shared = {n.id for n in self._nodes[1:] if counts[n.id] >= 2}
        keep = {
            n
            for n in shared
            if not (len(self._children[n]) == 1 and self._children[n][0] in shared)
            or self._node_leaves[n]
        }
        waves: dict[int, list[int]] = {}
        for n in sorted(keep):
            rank = sum(1 for a in self.path(n)[:-1] if a.id in keep)
            waves.setdefault(rank, []).append(n)
        return [waves[r] for r in sorted(waves)]

    def run(self, backend: Backend) -> list[LeafResult]:
        """Execute on `backend`; results in leaf order."""
        return backend.run_graph(self)

    async def arun(self, backend: Backend) -> list[LeafResult]:
        return await backend.arun_graph(self)

    def _check_node(self, node_id: int) -> None:
        if not 0 <= node_id < len(self._nodes):
            raise KeyError(f"no node {node_id} in this graph")


def _per_prompt_params(
    sampling_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, n: int
) -> list[Mapping[str, Any]]:
    if sampling_params is None or isinstance(sampling_params, Mapping):
        return [dict(sampling_params or {}) for _ in range(n)]
    if len(sampling_params) != n:
        raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
    return [dict(p) for p in sampling_params]


def _sequences(
    prompts: Sequence[str | Sequence[int]], tokenizer: Any
) -> tuple[list[Sequence[Any]], Literal["text", "ids"]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            return list(prompts), "text"
        return [tuple(tokenizer.encode(p)) for p in prompts], "ids"
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("mixing text and token-id prompts needs a tokenizer")
        return [
            tuple(tokenizer.encode(p)) if isinstance(p, str) else tuple(p) for p in prompts
        ], "ids"
    return [tuple(int(t) for t in p) for p in prompts], "ids"


class _TrieNode:
    __slots__ = ("seg", "children", "ends")

    def __init__(self, seg: Sequence[Any]) -> None:
        self.seg = seg
        self.children: dict[Any, _TrieNode] = {}
        self.ends: list[int] = []


def _trie_insert(root: _TrieNode, seq: Sequence[Any], index: int) -> None:
    node, rest = root, seq
    while rest:
        child = node.children.get(rest[0])
        if child is None:
            leaf = _TrieNode(rest)
            node.children[rest[0]] = leaf
            node = leaf
            break
        k = common_prefix_len(child.seg, rest)
        if k < len(child.seg):
            mid = _TrieNode(child.seg[:k])
            child.seg = child.seg[k:]
            mid.children[child.seg[0]] = child
            node.children[rest[0]] = mid
            child = mid
        node, rest = child, rest[k:]
    node.ends.append(index)


def _insert_trie(
    graph: CallGraph, seqs: list[Sequence[Any]], kind: Literal["text", "ids"], tokenizer: Any
) -> list[int]:
    """Build the compressed trie of `seqs` under the root; returns the end node of each seq."""
    root = _TrieNode(seqs[0][:0] if seqs else ())
    for i, seq in enumerate(seqs):
        _trie_insert(root, seq, i)
    ends = [ROOT] * len(seqs)
    stack: list[tuple[_TrieNode, int]] = [(root, ROOT)]
    while stack:
        tnode, gid = stack.pop()
        for i in tnode.ends:
            ends[i] = gid
        for child in reversed(list(tnode.children.values())):
            stack.append((child, _add_segment(graph, gid, child.seg, kind, tokenizer)))
    return ends


def _add_segment(
    graph: CallGraph, parent: int, seg: Sequence[Any], kind: str, tokenizer: Any
) -> int:
    if kind == "text":
        return graph.add_node(parent, str(seg))
    text = tokenizer.decode(list(seg)) if tokenizer is not None else None
    return graph.add_node(parent, text, token_ids=seg)
