"""Structured extraction: a JSON object decoded under a JSON schema, then single fields under
a regex and an integer type, so every output parses.

Usage: python examples/json_extraction.py
"""

import json

import sgl_adapters.lang as sgl  # with SGLang: import sglang as sgl

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@sgl.function
def extract_person(s, text, max_tokens=64):
    s += "Extract the person described in the text as JSON.\n"
    s += "Text: " + text + "\n"
    s += "JSON: " + sgl.gen("person", max_tokens=max_tokens, json_schema=json.dumps(PERSON_SCHEMA))
    s += "\nName only: " + sgl.gen("name", max_tokens=8, regex=r"[A-Z][a-z]+")
    s += "\nAge only: " + sgl.gen_int("age", max_tokens=4)


def main(max_tokens=64):
    state = extract_person.run(
        text="Alice is a 30 year old engineer who lives in Paris.",
        max_tokens=max_tokens,
        temperature=0,
    )
    return {"person": json.loads(state["person"]), "name": state["name"], "age": state["age"]}


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Runtime())
    print(main())
