"""Backends of the native frontend: `Runtime` (the in-process engine) and `RuntimeEndpoint`
(any server speaking SGLang's HTTP `/generate` protocol).

Both speak the same request shape, SGLang's /generate body (`text` or `input_ids`,
`sampling_params`, `return_logprob`, `logprob_start_len`, `top_logprobs_num`, `stream`);
`LangBackend` builds generation, streaming, prefix caching and `select` on top of `request`
and `request_stream`. Backends are safe to call from many program threads at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from sgl_adapters.graph import common_prefix_len
from sgl_adapters.lang import chat_template as templates
from sgl_adapters.lang.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from sgl_adapters.lang.ir import GenParams
from sgl_adapters.lang.runtime_api import RuntimeAPI, engine_server_info

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


class Runtime(RuntimeAPI, LangBackend):
    """The in-process engine: `Runtime()` loads the embedded SmolLM2, `Runtime(model_path=...)`
    a local folder, `Runtime(engine=eng)` wraps an existing `sgl_engine.Engine` (not owned).
    Other keyword arguments are engine config fields (device, max_total_tokens, ...).

    Engines come from the plugin layer's `local` backend, so a LangChain model, a DSPy LM and
    an SGLang program on the same model and config in one process share one engine (one copy
    of the weights, one radix cache)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        engine: Any = None,
        chat_template: templates.ChatTemplate | str | None = None,
        log_level: str | None = None,
        launch_timeout: float | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """`log_level` and `launch_timeout` (SGLang's server-process options) are accepted
        and unused: the engine runs in this process. `chat_template` may be a template or the
        name of one of SGLang's (`sgl_adapters.lang.chat_template.NAMED`)."""
        if isinstance(chat_template, str):
            chat_template = templates.get_chat_template(chat_template)
        self._local = None
        if engine is None:
            from sgl_plugins.manager import get_backend

            self._local = get_backend("local", model_path=model_path, **engine_kwargs)
            engine = self._local.engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = chat_template or templates.from_tokenizer(self.tokenizer)

    def _args(self, data: Json) -> dict[str, Any]:
        return {
            "prompt": data.get("text"),
            "input_ids": data.get("input_ids"),
            "sampling_params": data.get("sampling_params"),
            "return_logprob": data.get("return_logprob", False),
            "logprob_start_len": data.get("logprob_start_len", -1),
            "top_logprobs_num": data.get("top_logprobs_num", 0),
        }

    def request(self, data: Json) -> Json | list[Json]:
        return self.engine.generate(**self._args(data))

    def request_stream(self, data: Json) -> Iterator[Json]:
        return self.engine.generate(**self._args(data), stream=True)

    def flush_cache(self) -> bool:
        return bool(self.engine.flush_cache())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def metrics(self) -> dict[str, Any]:
        return self.engine.metrics()

    def server_info(self) -> dict[str, Any]:
        return engine_server_info(self.engine)

    def shutdown(self) -> None:
        """Release this runtime's share of the engine (shut down with its last user)."""
        if self._local is not None:
            self._local.close()
            self._local = None


class RuntimeEndpoint(LangBackend):
    """A server speaking SGLang's HTTP protocol (`/generate`, `/get_model_info`,
    `/get_server_info`, `/flush_cache`): our server or a real SGLang server. `tokenizer`
    (optional, HF) enables token-id select scoring; without it `select` heals tokens by their
    text. The chat template is, first found: `chat_template`, SGLang's named template
    `chat_template_name`, the tokenizer's, the served model's (its tokenizer folder when on
    this machine, else looked up by model name as SGLang does). `verify` is httpx's TLS
    verification (a CA bundle path or a bool)."""

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
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            verify=True if verify is None else verify,
        )
        self.model_info = self._check(self._client.get("/get_model_info")).json()
        self.tokenizer = tokenizer
        if chat_template is None and chat_template_name:
            chat_template = templates.get_chat_template(chat_template_name)
        if chat_template is None and tokenizer is not None:
            chat_template = templates.from_tokenizer(tokenizer)
        self.chat_template = chat_template or templates.for_served_model(self.model_info)

    @staticmethod
    def _check(res: Any) -> Any:
        if res.status_code != 200:
            raise RuntimeError(_error_message(res))
        return res

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path", ""))

    def request(self, data: Json) -> Json | list[Json]:
        return self._check(self._client.post("/generate", json=data)).json()

    def request_stream(self, data: Json) -> Iterator[Json]:
        with self._client.stream("POST", "/generate", json=data) as res:
            if res.status_code != 200:
                res.read()
                raise RuntimeError(_error_message(res))
            for line in res.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(_error_text(chunk["error"]))
                yield chunk

    def flush_cache(self) -> bool:
        res = self._client.post("/flush_cache")
        return res.status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        """The server's /get_server_info (SGLang's route)."""
        return self._check(self._client.get("/get_server_info")).json()

    def shutdown(self) -> None:
        self._client.close()


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
