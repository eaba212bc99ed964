"""A tokenizer that lives on the server: the `http` backend's fallback when no local copy of
the model's tokenizer exists (servers that hide their paths, remote machines).

`encode`/`decode` call the server's `/tokenize` and `/detokenize` (one round trip each); chats
are rendered here with the server's chat template and special tokens from `/get_server_info`,
through transformers' own Jinja renderer, so prompts equal the server's. Thread-safe (the
httpx client is); holds no mutable state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RemoteTokenizer:
    def __init__(self, client: Any, server_info: dict[str, Any]) -> None:
        self._client = client
        self.chat_template = server_info.get("chat_template")
        self.bos_token = server_info.get("bos_token")
        self.eos_token = server_info.get("eos_token")
        self.all_special_ids = list(server_info.get("all_special_ids") or [])

    @classmethod
    def probe(cls, client: Any, server_info: dict[str, Any]) -> RemoteTokenizer | None:
        """A RemoteTokenizer when the server has a chat template and /tokenize, else None."""
        if not server_info.get("chat_template"):
            return None
        res = client.post("/tokenize", json={"prompt": "", "add_special_tokens": False})
        return cls(client, server_info) if res.status_code == 200 else None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        res = self._client.post(path, json=body)
        if res.status_code != 200:
            raise RuntimeError(f"{path} failed: HTTP {res.status_code}: {res.text[:300]}")
        return res.json()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"prompt": text, "add_special_tokens": add_special_tokens}
        return list(self._post("/tokenize", body)["tokens"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._post("/detokenize", {"tokens": [int(i) for i in ids]})["text"]
        if skip_special_tokens:
            for token in (self.bos_token, self.eos_token):
                if token:
                    text = text.replace(token, "")
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        from transformers.utils.chat_template_utils import render_jinja_template

        template = chat_template or self.chat_template
        if not template:
            raise NotImplementedError("the server published no chat template")
        rendered, _ = render_jinja_template(
            [messages],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )
        return self.encode(rendered[0], add_special_tokens=False) if tokenize else rendered[0]
