"""Backends of the native frontend, all over the plugin layer's `Backend` protocol:
`Runtime` (the in-process engine, or any backend by name or instance), `RuntimeEndpoint` (any
server speaking SGLang's HTTP `/generate` protocol, via the `http` plugin) and `OpenAI` (any
OpenAI-compatible server, via the `openai` plugin).

Both speak the same request shape, SGLang's /generate body (`text` or `input_ids`,
`sampling_params`, `return_logprob`, `logprob_start_len`, `top_logprobs_num`, `stream`);
`LangBackend` builds generation, streaming, prefix caching and `select` on top of `request`
and `request_stream`. Backends are safe to call from many program threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sgl_plugins.backend import require
from sgl_plugins.graph import CallGraph, common_prefix_len

from sgl_adapters.engines import as_dict, chunk_dict
from sgl_adapters.lang import chat_template as templates
from sgl_adapters.lang.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from sgl_adapters.lang.ir import GenParams
from sgl_adapters.lang.runtime_api import RuntimeAPI, engine_server_info
from sgl_adapters.lang.unsupported import UnsupportedFeatureError

Json = dict[str, Any]


class LangBackend:
    """What the interpreter calls. Subclasses implement `request`, `request_stream` and
    `flush_cache`, and set `tokenizer` (None: text-only) and `chat_template`."""

    tokenizer: Any = None
    chat_template: templates.ChatTemplate = templates.PLAIN

    def request(self, data: Json) -> Json | list[Json]:
        """One /generate call; a dict for one prompt, a list for a list of prompts or n > 1."""
        raise NotImplementedError

    def request_stream(self, data: Json) -> Iterator[Json]:
        """One streamed /generate call: chunks with cumulative `text` and `meta_info`."""
        raise NotImplementedError

    def flush_cache(self) -> bool:
        raise NotImplementedError

    def shutdown(self) -> None:
        return None

    def get_chat_template(self) -> templates.ChatTemplate:
        return self.chat_template

    # -- built on `request` -------------------------------------------------------------------

    def generate(self, prompt: str, params: GenParams) -> tuple[str | list[str], Any]:
        """(completion, meta_info); lists of both when `params.n` > 1."""
        data = {"text": prompt, "sampling_params": params.sampling_params()}
        data.update(params.logprob_options())
        out = self.request(data)
        if isinstance(out, list):
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, prompt: str, params: GenParams) -> Iterator[tuple[str, Json]]:
        """(new text, meta_info) pieces of one streamed completion."""
        data = {"text": prompt, "sampling_params": params.sampling_params(), "stream": True}
        data.update(params.logprob_options())
        sent = 0
        for chunk in self.request_stream(data):
            text = chunk.get("text", "")
            yield text[sent:], chunk.get("meta_info", {})
            sent = max(sent, len(text))

    def cache_prefix(self, prefixes: str | Sequence[str] | Sequence[Sequence[int]]) -> None:
        """Prefill `prefixes` (text or token ids) without generating, so later calls reuse them."""
        params = {"max_new_tokens": 0}
        if isinstance(prefixes, str):
            self.request({"text": prefixes, "sampling_params": params})
        elif prefixes and all(isinstance(p, str) for p in prefixes):
            self.request({"text": list(prefixes), "sampling_params": params})
        elif prefixes:
            self.request({"input_ids": [list(p) for p in prefixes], "sampling_params": params})

    def select(
        self,
        prompt: str,
        choices: Sequence[str],
        temperature: float,
        method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        """Score each choice as a continuation of `prompt` (prefill only) and let `method`
        decide. Token healing: when the prompt's last tokens merge with a choice, the scored
        span starts at the first token that differs from the prompt's own tokenization."""
        if not choices:
            raise ValueError("select needs at least one choice")
        if temperature > 1e-5:
            raise ValueError("select only supports temperature 0")
        if self.tokenizer is not None:
            inputs = self._choice_logprobs_by_ids(prompt, choices)
        else:
            inputs = self._choice_logprobs_by_text(prompt, choices)
        unconditional = None
        if method.requires_unconditional_logprobs:
            unconditional = self._unconditional_logprobs(inputs)
        return method(
            choices=list(choices),
            normalized_prompt_logprobs=[mean_logprob(x) for x in inputs],
            input_token_logprobs=inputs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )

    def _score(self, key: str, inputs: list[Any], starts: list[int]) -> list[list[list[Any]]]:
        data = {
            key: inputs,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": starts,
        }
        out = self.request(data)
        out = out if isinstance(out, list) else [out]
        return [[list(e) for e in o["meta_info"]["input_token_logprobs"]] for o in out]

    def _choice_logprobs_by_ids(self, prompt: str, choices: Sequence[str]) -> list[list[Any]]:
        prefix = self.tokenizer.encode(prompt)
        fulls = [self.tokenizer.encode(prompt + c) for c in choices]
        starts = [min(common_prefix_len(prefix, f), len(f) - 1) for f in fulls]
        scored = self._score("input_ids", fulls, starts)
        for entries in scored:
            for e in entries:
                if len(e) < 3 or e[2] is None:
                    e[2:] = [self.tokenizer.decode([e[1]])]
        return scored

    def _choice_logprobs_by_text(self, prompt: str, choices: Sequence[str]) -> list[list[Any]]:
        out = self.request({"text": prompt, "sampling_params": {"max_new_tokens": 0}})
        start = max(int(out["meta_info"]["prompt_tokens"]) - 2, 0)
        scored = self._score("text", [prompt + c for c in choices], [start] * len(choices))
        return [_drop_prompt_tokens(e, c) for e, c in zip(scored, choices, strict=True)]

    def _unconditional_logprobs(self, inputs: list[list[Any]]) -> list[list[Any]]:
        ids = [[int(e[1]) for e in entries] for entries in inputs]
        if any(not x for x in ids):
            raise ValueError("a choice has no tokens to score")
        return self._score("input_ids", ids, [0] * len(ids))


def _drop_prompt_tokens(entries: list[list[Any]], choice: str) -> list[list[Any]]:
    """Keep the entries covering `choice`: drop leading ones whose text lies in the prompt."""
    texts = [str(e[2]) if len(e) > 2 and e[2] is not None else "" for e in entries]
    in_prompt = sum(len(t) for t in texts) - len(choice)
    acc, k = 0, 0
    while k < len(entries) - 1 and acc + len(texts[k]) <= in_prompt:
        acc += len(texts[k])
        k += 1
    return entries[k:]


class BackendRuntime(LangBackend):
    """A `LangBackend` over any sgl-adapters `Backend` (the plugin protocol only): SGLang
    /generate bodies become CallGraphs, results come back in SGLang's shape. The lang chat
    template comes from the backend's tokenizer unless given."""

    def __init__(
        self, backend: Any, *, chat_template: templates.ChatTemplate | None = None
    ) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.chat_template = chat_template or templates.from_tokenizer(self.tokenizer)
        self._owned = False

    @property
    def name(self) -> str:
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    def request(self, data: Json) -> Json | list[Json]:
        graph, single = _graph_of(data)
        for leaf in graph.leaves:
            if leaf.constraint is not None:
                require(self.backend, leaf.constraint[0], f"gen with {leaf.constraint[0]}")
        if any(leaf.return_logprob for leaf in graph.leaves):
            require(self.backend, "logprobs", "select / logprobs")
        outs = [as_dict(r) for r in self.backend.run_graph(graph)]
        return outs[0] if single else outs

    def request_stream(self, data: Json) -> Iterator[Json]:
        graph, single = _graph_of(data)
        if not single:
            raise ValueError("a streamed request takes one prompt")
        (leaf,) = graph.leaves
        prompt = graph.path(leaf.node)[-1]
        fields = {
            "return_logprob": leaf.return_logprob,
            "logprob_start_len": leaf.logprob_start_len,
            "top_logprobs_num": leaf.top_logprobs_num,
            "return_text_in_logprobs": leaf.return_text_in_logprobs,
        }
        target = prompt.token_ids if prompt.token_ids is not None else prompt.text
        for chunk in self.backend.stream(target, leaf.request_params(), **fields):
            yield chunk_dict(chunk)

    def flush_cache(self) -> bool:
        flush = getattr(self.backend, "flush_cache", None)
        return bool(flush()) if callable(flush) else False

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def metrics(self) -> dict[str, Any]:
        return dict(self.backend.metrics())

    def shutdown(self) -> None:
        """Release the backend when this runtime built it (a shared engine is shut down with
        its last user)."""
        if self._owned:
            self.backend.close()
            self._owned = False


class Runtime(RuntimeAPI, BackendRuntime):
    """`Runtime()` loads the embedded SmolLM2 in-process, `Runtime(model_path=...)` a local
    folder, `Runtime(engine=eng)` wraps an existing `sgl_engine.Engine` (not owned); other
    keyword arguments are engine config fields (device, max_total_tokens, ...).
    `Runtime(backend=...)` runs on any backend instead: a `Backend` instance, or a registered
    plugin name built with the keyword arguments (`backend_kwargs` where names clash).

    Engines come from the plugin layer's `local` backend, so a LangChain model, a DSPy LM and
    an SGLang program on the same model and config in one process share one engine (one copy
    of the weights, one radix cache)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        engine: Any = None,
        chat_template: templates.ChatTemplate | str | None = None,
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        log_level: str | None = None,
        launch_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        """`log_level` and `launch_timeout` (SGLang's server-process options) are accepted
        and unused: no server process is launched. `chat_template` may be a template or the
        name of one of SGLang's (`sgl_adapters.lang.chat_template.NAMED`)."""
        from sgl_plugins.manager import get_backend

        if isinstance(chat_template, str):
            chat_template = templates.get_chat_template(chat_template)
        owned = True
        if backend is not None and not isinstance(backend, str):
            built, owned = backend, False
        elif engine is not None:
            built = get_backend("local", engine=engine)
        elif backend in (None, "local"):
            built = get_backend("local", model_path=model_path, **kwargs, **(backend_kwargs or {}))
        else:
            if model_path is not None:
                kwargs.setdefault("model", model_path)
            built = get_backend(backend, **kwargs, **(backend_kwargs or {}))
        super().__init__(built, chat_template=chat_template)
        self._owned = owned

    @property
    def engine(self) -> Any:
        """The in-process engine of a `local` runtime (for users; programs never use it)."""
        return self.backend.engine

    def server_info(self) -> dict[str, Any]:
        own = getattr(self.backend, "get_server_info", None)
        if callable(own):
            return dict(own())
        return engine_server_info(self.engine)


class RuntimeEndpoint(BackendRuntime):
    """A server speaking SGLang's HTTP protocol (`/generate`, `/get_model_info`,
    `/get_server_info`, `/flush_cache`): our server or a real SGLang server, through the
    `http` backend plugin. `tokenizer` (HF, or a folder) enables token-id select scoring (the
    server's tokenizer folder is used when it exists on this machine); without one `select`
    heals tokens by text. The chat template is, first found: `chat_template`, SGLang's named
    template `chat_template_name`, the tokenizer's, the served model's (the Jinja template its
    /get_server_info reports, else looked up by model name as SGLang does). `verify` is
    httpx's TLS verification (a CA bundle path or a bool)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: str | bool | None = None,
        chat_template_name: str | None = None,
        *,
        tokenizer: Any = None,
        chat_template: templates.ChatTemplate | None = None,
        timeout: float = 600.0,
        backend: str = "http",
        **backend_kwargs: Any,
    ) -> None:
        from sgl_plugins.manager import get_backend

        if verify is not None:
            backend_kwargs["verify"] = verify
        built = get_backend(
            backend,
            base_url=base_url,
            api_key=api_key,
            tokenizer=tokenizer,
            timeout=timeout,
            **backend_kwargs,
        )
        if chat_template is None and chat_template_name:
            chat_template = templates.get_chat_template(chat_template_name)
        super().__init__(built, chat_template=chat_template)
        self._owned = True
        self.base_url = base_url.rstrip("/")
        self.model_info = getattr(built, "model_info", {})
        if chat_template is None and self.tokenizer is None:
            self.chat_template = templates.for_served_model(self.model_info, self._server_info)

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path", ""))

    def get_server_info(self) -> dict[str, Any]:
        """The server's /get_server_info (SGLang's route)."""
        own = getattr(self.backend, "get_server_info", None)
        if not callable(own):
            raise RuntimeError(f"backend {self.name!r} reports no server info")
        return dict(own())

    def start_profile(self) -> None:
        raise UnsupportedFeatureError(
            "RuntimeEndpoint.start_profile: profiling a server is not part of this client; "
            "see benchmarks/profile_gpu.py"
        )

    stop_profile = start_profile

    def _server_info(self) -> dict[str, Any]:
        try:
            return self.get_server_info()
        except Exception:  # noqa: BLE001 -- a server without the route: look up by name
            return {}


def OpenAI(  # noqa: N802 - SGLang's name for its OpenAI backend
    model_name: str,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    chat_template: templates.ChatTemplate | None = None,
    **kwargs: Any,
) -> Runtime:
    """SGLang programs on any OpenAI-compatible server (the `openai` backend plugin), like
    SGLang's `sgl.OpenAI("gpt-4o-mini")`. `select` needs prompt logprobs, which such servers
    rarely give: it raises a capability error naming the backend."""
    from sgl_plugins.manager import get_backend

    args = {"model": model_name, "base_url": base_url, "api_key": api_key, **kwargs}
    built = get_backend("openai", **{k: v for k, v in args.items() if v is not None})
    return Runtime(backend=built, chat_template=chat_template)


def _per_leaf(value: Any, n: int, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    return list(value) if isinstance(value, list) else [value] * n


def _graph_of(data: Json) -> tuple[CallGraph, bool]:
    """The CallGraph of one /generate body (one node per prompt, `n` leaves on it), and
    whether the body was a single prompt with n == 1 (answered with a dict)."""
    ids = data.get("input_ids")
    prompts: Any = data.get("text") if ids is None else ids
    single = isinstance(prompts, str) or (
        ids is not None and prompts and isinstance(prompts[0], int)
    )
    prompts = [prompts] if single else list(prompts or [])
    count = len(prompts)
    params = _per_leaf(data.get("sampling_params"), count, {})
    logprob = _per_leaf(data.get("return_logprob"), count, False)
    starts = _per_leaf(data.get("logprob_start_len"), count, -1)
    tops = _per_leaf(data.get("top_logprobs_num"), count, 0)
    texts = bool(data.get("return_text_in_logprobs"))
    graph = CallGraph()
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            node = graph.add_node(graph.root, prompt)
        else:
            node = graph.add_node(graph.root, token_ids=prompt)
        sp = dict(params[i] or {})
        n = int(sp.pop("n", 1) or 1)
        single = single and n == 1
        for _ in range(n):
            graph.add_leaf(
                node,
                sp,
                return_logprob=bool(logprob[i]),
                logprob_start_len=int(starts[i]),
                top_logprobs_num=int(tops[i] or 0),
                return_text_in_logprobs=texts,
            )
    return graph, single


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _error_message(res: Any) -> str:
    try:
        body = res.json()
    except ValueError:
        return f"HTTP {res.status_code}: {res.text}"
    if isinstance(body, dict) and "error" in body:
        return f"HTTP {res.status_code}: {_error_text(body['error'])}"
    if isinstance(body, dict) and "detail" in body:
        return f"HTTP {res.status_code}: {body['detail']}"
    return f"HTTP {res.status_code}: {body}"
