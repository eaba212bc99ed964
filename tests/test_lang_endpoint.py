"""RuntimeEndpoint against a small SGLang-protocol /generate server started on 127.0.0.1.

The fake server translates SGLang's HTTP body to `Engine.generate` (text or input_ids,
sampling_params, return_logprob, logprob_start_len, return_text_in_logprobs, SSE stream), so
the same program must give the same results through HTTP as in-process.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sgl_engine.errors import InvalidRequestError

import sgl_adapters.lang as sgl

GREEDY = {"temperature": 0.0}


def _with_texts(out: dict, tokenizer) -> dict:
    for key in ("input_token_logprobs", "output_token_logprobs"):
        entries = out["meta_info"].get(key)
        if entries:
            out["meta_info"][key] = [[e[0], e[1], tokenizer.decode([e[1]])] for e in entries]
    return out


def serve_sglang_protocol(engine, model_path: str):
    """Start a threaded HTTP server speaking SGLang's /generate; returns (server, url, log)."""
    log: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return None

        def _json(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/get_model_info":
                self._json(200, {"model_path": model_path, "is_generation": True})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"{}")
            if self.path == "/flush_cache":
                self._json(200 if engine.flush_cache() else 400, {})
                return
            log.append(body)
            args = dict(
                prompt=body.get("text"),
                input_ids=body.get("input_ids"),
                sampling_params=body.get("sampling_params"),
                return_logprob=body.get("return_logprob", False),
                logprob_start_len=body.get("logprob_start_len", -1),
                top_logprobs_num=body.get("top_logprobs_num", 0),
            )
            texts = body.get("return_text_in_logprobs", False)
            try:
                if body.get("stream"):
                    chunks = engine.generate(**args, stream=True)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for chunk in chunks:
                        chunk.pop("delta", None)
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                out = engine.generate(**args)
            except InvalidRequestError as exc:
                self._json(400, {"error": {"message": str(exc)}})
                return
            if texts:
                out = (
                    [_with_texts(o, engine.tokenizer) for o in out]
                    if isinstance(out, list)
                    else _with_texts(out, engine.tokenizer)
                )
            self._json(200, out)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", log


@pytest.fixture
def served(make_engine, tiny_llama):
    engine = make_engine(tiny_llama)
    server, url, log = serve_sglang_protocol(engine, tiny_llama)
    yield engine, url, log
    server.shutdown()
    server.server_close()


@sgl.function
def program(s, q):
    s += "Question: " + q + "\nAnswer:" + sgl.gen("answer", max_tokens=6, stop="\n")
    s += "\nPick:" + sgl.select("pick", [" Paris", " yes", " the lazy dog"])
    forks = s.fork(2)
    forks += lambda i: f" idea {i}:" + sgl.gen("idea", max_tokens=3)
    forks.join()


def test_endpoint_matches_in_process_runtime(served):
    engine, url, log = served
    local = sgl.Runtime(engine=engine)
    remote = sgl.RuntimeEndpoint(url, tokenizer=engine.tokenizer)
    assert remote.get_model_name()
    a = program.run(q="What is two plus two?", backend=local, **GREEDY)
    b = program.run(q="What is two plus two?", backend=remote, **GREEDY)
    assert b.error() is None
    assert (b["answer"], b["pick"], b["idea"]) == (a["answer"], a["pick"], a["idea"])
    assert b.get_meta_info("pick")["normalized_prompt_logprobs"] == pytest.approx(
        a.get_meta_info("pick")["normalized_prompt_logprobs"], abs=1e-4
    )
    sent = [body.get("sampling_params", {}) for body in log]
    sent = [p for sp in sent for p in (sp if isinstance(sp, list) else [sp])]
    assert any(p.get("max_new_tokens") == 0 for p in sent)
    assert remote.flush_cache() is True
    remote.shutdown()


def test_endpoint_without_tokenizer_heals_tokens_by_text(served):
    engine, url, _ = served
    local = sgl.Runtime(engine=engine)
    remote = sgl.RuntimeEndpoint(url)

    @sgl.function
    def pick(s):
        s += "The capital of France is Pa" + sgl.select("c", ["ris", "x", "quick"])

    a, b = pick.run(backend=local), pick.run(backend=remote)
    assert b["c"] == a["c"]
    ma, mb = a.get_meta_info("c"), b.get_meta_info("c")
    assert [[e[1] for e in x] for x in mb["input_token_logprobs"]] == [
        [e[1] for e in x] for x in ma["input_token_logprobs"]
    ]
    assert mb["normalized_prompt_logprobs"] == pytest.approx(
        ma["normalized_prompt_logprobs"], abs=1e-4
    )
    remote.shutdown()


def test_endpoint_streams_and_reports_errors(served):
    engine, url, _ = served
    remote = sgl.RuntimeEndpoint(url, tokenizer=engine.tokenizer)

    @sgl.function
    def stream_prog(s):
        s += "The quick brown fox" + sgl.gen("a", max_tokens=8, min_tokens=8)

    state = stream_prog.run(backend=remote, stream=True, **GREEDY)
    pieces = list(state.text_iter("a"))
    assert len(pieces) > 1 and "".join(pieces) == state["a"]
    ref = engine.generate(
        "The quick brown fox", {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
    )
    assert state["a"] == ref["text"]

    @sgl.function
    def bad(s):
        s += "Hi" + sgl.gen("a", max_tokens=-1)

    for stream in (False, True):
        st = bad.run(backend=remote, stream=stream)
        with pytest.raises(sgl.ProgramError, match="HTTP 400.*max_new_tokens"):
            st["a"]
    remote.shutdown()


def test_endpoint_unreachable_is_a_clear_error():
    import httpx

    with pytest.raises(httpx.ConnectError):
        sgl.RuntimeEndpoint("http://127.0.0.1:9", timeout=2.0)
