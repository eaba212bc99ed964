"""Property-based fuzz of the HTTP API from its own OpenAPI schema (issue 17).

Why schemathesis: it turns the schema FastAPI already derives from our pydantic request models
into hypothesis strategies per operation, in both positive (valid by the schema) and negative
(violating it) modes, and it sends the cases over real HTTP. hypothesis-jsonschema would give
the bodies only, and we would rewrite the per-operation wiring, headers and query handling that
schemathesis provides. We drive it from plain hypothesis `@given` (not its runner) so each
case can carry our own checks and the budget stays fixed.

For every case, against a real uvicorn server on a tiny random model: no 5xx, no response over
`MAX_RESPONSE_BYTES`, every 4xx a JSON error naming a field. Afterwards the server answers
/health, the engine is idle with no KV slot or lock leaked, and only the radix cache holds KV.
Derandomised (the same cases every run) and bounded: `EXAMPLES` cases per operation and mode.
"""

from __future__ import annotations

import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from sgl_engine.server import ServerThread, create_app  # noqa: E402

EXAMPLES = 20
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
SCHEMA = schemathesis.openapi.from_dict(create_app(None).openapi())
OPERATIONS = {
    f"{op.method.upper()} {op.path}": op
    for op in (result.ok() for result in SCHEMA.get_all_operations())
}
CASES = [
    (label, mode)
    for label, op in sorted(OPERATIONS.items())
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or len(op.body) > 0  # nothing to violate without a body
]
STATS = {"requests": 0, "server_errors": 0, "by_status": {}, "largest": 0, "started": None}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from sgl_engine import Engine
    from sgl_engine.testing import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("fuzz") / "tiny", arch="llama")
    engine = Engine(str(path), device="cpu", max_total_tokens=8192, context_length=64)
    with ServerThread(create_app(engine, model_name="tiny")) as srv:
        STATS["started"] = time.monotonic()
        yield engine, srv.base_url
    engine.shutdown()


def _check(case, resp) -> None:
    status = resp.status_code
    STATS["requests"] += 1
    STATS["by_status"][status] = STATS["by_status"].get(status, 0) + 1
    STATS["largest"] = max(STATS["largest"], len(resp.content))
    where = f"{case.method} {case.path} body={case.body!r:.300}"
    if status >= 500:
        STATS["server_errors"] += 1
        raise AssertionError(f"{status} for {where}: {resp.text[:500]}")
    assert len(resp.content) <= MAX_RESPONSE_BYTES, f"{len(resp.content)} bytes for {where}"
    if 400 <= status < 500:
        error = resp.json()["error"]
        assert error["message"], where
        if status not in (404, 405, 413) or error.get("code") == "model_not_found":
            assert error["param"], f"no field named for {where}: {error}"


@pytest.mark.slow
@pytest.mark.parametrize("label, mode", CASES, ids=[f"{lb}-{m.value}" for lb, m in CASES])
def test_fuzz_operation(fuzz_server, label, mode):
    _, base_url = fuzz_server
    strategy = OPERATIONS[label].as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        _check(case, case.call(base_url=base_url, timeout=60))

    run()


@pytest.mark.slow
def test_after_the_fuzz_the_server_is_healthy_and_holds_only_cache(fuzz_server):
    engine, base_url = fuzz_server
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    engine.check_invariants()
    m = engine.metrics()
    assert m["running"] == m["waiting"] == 0
    assert m["kv_used"] == m["cache_tokens"], "KV beyond the radix cache is still held"
    assert engine._channels == {}
    elapsed = time.monotonic() - STATS["started"]
    print(
        f"\nfuzzed {STATS['requests']} requests in {elapsed:.1f} s over {len(OPERATIONS)} "
        f"operations ({len(CASES)} operation-modes); statuses {dict(sorted(STATS['by_status'].items()))}; "
        f"5xx: {STATS['server_errors']}; largest response {STATS['largest']} bytes"
    )
    assert STATS["requests"] > 0 and STATS["server_errors"] == 0
