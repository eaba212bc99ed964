"""The built-in `http` backend: CallGraphs and calls against an SGLang-protocol HTTP server.

Talks SGLang's native API (`/generate`, `/get_model_info`, `/get_server_info`, `/flush_cache`,
`/metrics`), which our `sgl_engine.server` and a real SGLang server both serve (a missing
`/get_server_info` is tolerated). A graph's leaves go out as one batched `/generate` request in
leaf order, so a server that shares prefixes inside a batch (ours does, and says so in
/get_server_info) prefills each shared prefix once; for other servers the shared prefixes are
prefilled first, wave by wave, so the leaves then hit the server's radix cache. Without a local
tokenizer, chats go to the server's /v1/chat/completions (it renders the template) and graphs
share prefixes by characters. Continuation scoring uses the server's tokenization (prompt logprobs with token ids), so
no local tokenizer is needed; one is loaded only when asked for, or when the server's
tokenizer folder exists on this machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from sgl_plugins.backend import (
    BackendBase,
    ContinuationScore,
    StreamChunk,
    continuation_score,
    leaf_result_from_sglang,
    single_leaf_graph,
    stream_chunk_from_sglang,
)
from sgl_plugins.graph import CallGraph, Leaf, LeafResult, common_prefix_len
from sgl_plugins.hookspecs import hookimpl

DEFAULT_URL = "http://127.0.0.1:30000"
CAPABILITIES = frozenset(
    {
        "generate",
        "stream",
        "score",
        "constrained",
        "logprobs",
        "prefix_cache",
        "prefix_dedup",
        "token_ids",
        "async",
    }
)


class HttpError(RuntimeError):
    """The server answered with an error status (the message is the server's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class InvalidHttpRequest(HttpError, ValueError):
    """A 4xx: the server refused the request itself (bad parameters, constraint, ...)."""


def _raise_for(status: int, body: bytes) -> None:
    if status == 200:
        return
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:500]
    raise (InvalidHttpRequest if 400 <= status < 500 else HttpError)(status, message)


_END: dict = {}


def _sse_payload(line: str) -> dict | None:
    """The JSON of one `data:` line, None for other lines, `_END` for `data: [DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return _END
    payload = json.loads(data)
    if "error" in payload:
        raise InvalidHttpRequest(400, payload["error"].get("message", str(payload)))
    return payload


class _Deltas:
    """SGLang streams cumulative text; chunks get `delta` = the new part (and the new
    tokens' logprobs). Mutates only itself."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0

    def __call__(self, payload: dict) -> StreamChunk:
        text = payload.get("text", "")
        delta = text[len(self.text) :] if text.startswith(self.text) else text
        self.text = text
        out = stream_chunk_from_sglang({**payload, "delta": delta}, sent_logprobs=self.sent)
        self.sent += len(out.output_token_logprobs)
        return out


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page by metric name (labels dropped, `sgl_engine_` and
    `_total` stripped), e.g. {'prefill_tokens': 120.0, 'kv_used': 64.0}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0].removeprefix("sgl_engine_").removesuffix("_total")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


class HttpBackend(BackendBase):
    """A Backend over an SGLang-protocol server at `base_url`. Thread-safe: one pooled
    `httpx.Client` for blocking calls, a short-lived `AsyncClient` per asyncio call."""

    capabilities = CAPABILITIES

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        tokenizer: Any = None,
        chat_template: str | None = None,
        timeout: float = 600.0,
        name: str = "http",
        warm_prefixes: bool | None = None,
        verify: Any = True,
    ) -> None:
        """`tokenizer`: an HF tokenizer, a name/folder to load one from, or None (then the
        server's tokenizer folder is used when it exists here). `warm_prefixes`: before a
        graph's leaves, prefill its shared prefixes (max_new_tokens=0, wave by wave) so a
        server that does not share prefixes inside one cold batch still prefills each once
        (None: only when /get_server_info does not say `in_batch_prefix_dedup`). `verify`:
        httpx's TLS verification of blocking calls (a bool or a CA bundle path)."""
        import httpx

        self.name = name
        self.base_url = base_url.rstrip("/")
        self.chat_template = chat_template
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._client = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout, verify=verify
        )
        self._api_key = api_key
        self.model_info = self._get_json("/get_model_info")
        self.server_info = self._optional_json("/get_server_info")
        if warm_prefixes is None:
            warm_prefixes = self.server_info.get("in_batch_prefix_dedup") is not True
        self.warm_prefixes = warm_prefixes
        self._tokenizer = self._load_tokenizer(tokenizer)
        self._chat_backend: Any = None
        if self._tokenizer is not None:
            self.capabilities = CAPABILITIES | {"chat_template"}
        else:
            self.capabilities = CAPABILITIES | {"chat"}

    # -- set-up -------------------------------------------------------------------------------

    def _load_tokenizer(self, tokenizer: Any) -> Any:
        """The given tokenizer; else the server's tokenizer folder when it exists here; else
        a `RemoteTokenizer` when the server offers /tokenize and a chat template; else None."""
        if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
            return tokenizer
        source = tokenizer or self.model_info.get("tokenizer_path")
        if tokenizer is None and not (source and os.path.isdir(str(source))):
            from sgl_plugins.builtin.remote_tokenizer import RemoteTokenizer

            return RemoteTokenizer.probe(self._client, self.server_info)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        info = self.model_info
        return str(info.get("served_model_name") or info.get("model_path") or self.base_url)

    def _chats(self) -> Any:
        """Chats without a local tokenizer go to the server's /v1/chat/completions, which
        renders the template (ours and SGLang's both serve it; constraints in the body)."""
        if self._chat_backend is None:
            from sgl_plugins.builtin.openai_compat import OpenAIBackend

            self._chat_backend = OpenAIBackend(
                self.model_name,
                base_url=self.base_url + "/v1",
                api_key=self._api_key,
                timeout=self._timeout,
                name=self.name,
                sglang_constraints=True,
            )
        return self._chat_backend

    def chat(self, messages, sampling_params=None, *, tools=None, **leaf) -> LeafResult:
        if self._tokenizer is not None:
            return super().chat(messages, sampling_params, tools=tools, **leaf)
        return self._chats().chat(messages, sampling_params, tools=tools, **leaf)

    def stream_chat(self, messages, sampling_params=None, *, tools=None, **leaf):
        if self._tokenizer is not None:
            return super().stream_chat(messages, sampling_params, tools=tools, **leaf)
        return self._chats().stream_chat(messages, sampling_params, tools=tools, **leaf)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self._tokenizer is None:
            raise NotImplementedError(f"backend {self.name!r} has no tokenizer to render chats")
        return super().apply_chat_template(messages, add_generation_prompt, tools)

    # -- plumbing -----------------------------------------------------------------------------

    def _get_json(self, path: str) -> Any:
        res = self._client.get(path)
        _raise_for(res.status_code, res.content)
        return res.json()

    def _optional_json(self, path: str) -> dict[str, Any]:
        """GET `path`, or {} where the server lacks the route (older SGLang servers)."""
        res = self._client.get(path)
        if res.status_code in (404, 405):
            return {}
        _raise_for(res.status_code, res.content)
        return res.json()

    def _warm_bodies(self, graph: CallGraph) -> list[dict[str, Any]]:
        """One max_new_tokens=0 request per wave of shared prefixes (parents first)."""
        if not self.warm_prefixes:
            return []
        bodies = []
        for wave in graph.shared_prefix_waves():
            if any(graph.uses_token_ids(n) for n in wave) and self._tokenizer is not None:
                key, prompts = "input_ids", [graph.prompt_ids(n, self._tokenizer) for n in wave]
            elif any(graph.uses_token_ids(n) for n in wave):
                continue
            else:
                key, prompts = "text", [graph.prompt_text(n) for n in wave]
            bodies.append({key: prompts, "sampling_params": [{"max_new_tokens": 0}] * len(wave)})
        return bodies

    def generate_raw(self, body: Mapping[str, Any]) -> Any:
        """POST `body` to /generate and return the decoded JSON (a dict or a list)."""
        res = self._client.post("/generate", json=dict(body))
        _raise_for(res.status_code, res.content)
        return res.json()

    async def agenerate_raw(self, body: Mapping[str, Any]) -> Any:
        import httpx

        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout
        ) as client:
            res = await client.post("/generate", json=dict(body))
        _raise_for(res.status_code, res.content)
        return res.json()

    def _batch_body(self, graph: CallGraph) -> dict[str, Any]:
        kind, prompts = graph.leaf_inputs(self._tokenizer)
        leaves = graph.leaves
        return {
            "input_ids" if kind == "ids" else "text": prompts,
            "sampling_params": [leaf.request_params() for leaf in leaves],
            "return_logprob": [leaf.return_logprob for leaf in leaves],
            "logprob_start_len": [leaf.logprob_start_len for leaf in leaves],
            "top_logprobs_num": [leaf.top_logprobs_num for leaf in leaves],
            "return_text_in_logprobs": any(leaf.return_text_in_logprobs for leaf in leaves),
        }

    @staticmethod
    def _results(leaves: Sequence[Leaf], outs: Any) -> list[LeafResult]:
        outs = outs if isinstance(outs, list) else [outs]
        if len(outs) != len(leaves):
            raise RuntimeError(f"server returned {len(outs)} results for {len(leaves)} leaves")
        return [leaf_result_from_sglang(leaf, out) for leaf, out in zip(leaves, outs, strict=True)]

    def _stream_body(self, prompt, sampling_params, leaf: dict) -> dict[str, Any]:
        body = self._batch_body(single_leaf_graph(prompt, sampling_params, **leaf))
        texts = body.pop("return_text_in_logprobs")
        return {
            **{k: v[0] for k, v in body.items()},
            "return_text_in_logprobs": texts,
            "stream": True,
        }

    # -- the Backend protocol -----------------------------------------------------------------

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        """The leaves as one batched /generate (after the prefix warm-up, when on)."""
        if not len(graph):
            return []
        for body in self._warm_bodies(graph):
            self.generate_raw(body)
        return self._results(graph.leaves, self.generate_raw(self._batch_body(graph)))

    async def arun_graph(self, graph: CallGraph) -> list[LeafResult]:
        if not len(graph):
            return []
        for body in self._warm_bodies(graph):
            await self.agenerate_raw(body)
        return self._results(graph.leaves, await self.agenerate_raw(self._batch_body(graph)))

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        body = self._stream_body(prompt, sampling_params, leaf)
        deltas = _Deltas()
        with self._client.stream("POST", "/generate", json=body) as res:
            if res.status_code != 200:
                _raise_for(res.status_code, res.read())
            for line in res.iter_lines():
                payload = _sse_payload(line)
                if payload is _END:
                    return
                if payload is not None:
                    yield deltas(payload)

    async def astream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> AsyncIterator[StreamChunk]:
        import httpx

        body = self._stream_body(prompt, sampling_params, leaf)
        deltas = _Deltas()
        async with (
            httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout
            ) as client,
            client.stream("POST", "/generate", json=body) as res,
        ):
            if res.status_code != 200:
                _raise_for(res.status_code, await res.aread())
            async for line in res.aiter_lines():
                payload = _sse_payload(line)
                if payload is _END:
                    return
                if payload is not None:
                    yield deltas(payload)

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """Prompt logprobs of each continuation from one batched request (the server prefills
        the prefix once). A continuation's tokens are those of tokenize(prefix + c) past the
        common prefix with tokenize(prefix), both tokenized by the server."""
        if not continuations:
            return []
        texts = [prefix, *(prefix + c for c in continuations)]
        outs = self.generate_raw(
            {
                "text": texts,
                "sampling_params": [{"max_new_tokens": 0} for _ in texts],
                "return_logprob": True,
                "logprob_start_len": 0,
            }
        )
        entries = [out["meta_info"]["input_token_logprobs"] for out in outs]
        prefix_ids = [e[1] for e in entries[0]]
        scores = []
        for text, full in zip(continuations, entries[1:], strict=True):
            ids = [e[1] for e in full]
            start = common_prefix_len(prefix_ids, ids)
            scores.append(continuation_score(text, ids[start:], [e[0] for e in full[start:]]))
        return scores

    def metrics(self) -> dict[str, Any]:
        res = self._client.get("/metrics")
        _raise_for(res.status_code, res.content)
        return parse_prometheus(res.text)

    def flush_cache(self) -> bool:
        return self._client.post("/flush_cache").status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        """The server's /get_server_info now (`server_info` is the copy read at start)."""
        return self._get_json("/get_server_info")

    def close(self) -> None:
        self._client.close()
        if self._chat_backend is not None:
            self._chat_backend.close()


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "http",
        HttpBackend,
        CAPABILITIES,
        description="an SGLang-protocol HTTP server (sgl-adapters serve, or SGLang itself)",
    )
