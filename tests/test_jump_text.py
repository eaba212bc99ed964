"""The text of constrained requests under jump-forward: a request nobody reads the text of
before it finishes is detokenised once at the end; streamed and stop-string requests token by
token. All three must give the text of the output ids."""

from __future__ import annotations

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "capital": {"type": "boolean"},
        "continent": {"enum": ["Africa", "Asia", "Europe"]},
    },
    "required": ["name", "capital", "continent"],
    "additionalProperties": False,
}


def test_constrained_text_is_the_same_streamed_with_stops_or_at_the_end(make_engine, tiny_llama):
    eng = make_engine(tiny_llama)
    sp = {"max_new_tokens": 64, "temperature": 1.0, "json_schema": SCHEMA}
    prompts = [f"Record {i}:" for i in range(4)]
    for seed in range(3):
        plain = eng.generate(prompts, [{**sp, "seed": seed + i} for i in range(4)])
        stops = eng.generate(prompts, [{**sp, "seed": seed + i, "stop": ["@@"]} for i in range(4)])
        assert [o["output_ids"] for o in stops] == [o["output_ids"] for o in plain]
        assert [o["text"] for o in stops] == [o["text"] for o in plain]
        assert sum(o["meta_info"]["forced_tokens"] for o in plain) > 0
        for i, o in enumerate(plain):
            chunks = list(eng.generate(prompts[i], {**sp, "seed": seed + i}, stream=True))
            assert chunks[-1]["output_ids"] == o["output_ids"]
            assert chunks[-1]["text"] == o["text"] == "".join(c["delta"] for c in chunks)
            want = eng.tokenizer.decode(o["output_ids"], skip_special_tokens=True)
            assert o["text"] == want
