"""A chat agent with one tool: the model chooses between a calculator and answering directly,
writes the expression under a regex, the program evaluates it, and the result goes back into
the conversation before the final answer.

Usage: python examples/chat_agent.py
"""

import ast
import operator

import sgl_adapters.lang as sgl  # with SGLang: import sglang as sgl

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def calculate(expression):
    """Evaluate + - * / over numbers (no names, no calls)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not arithmetic: {expression!r}")

    try:
        return ev(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"


@sgl.function
def agent(s, question, max_tokens=24):
    s += sgl.system("You are a helpful assistant. For arithmetic, always use the calculator.")
    s += sgl.user(question)
    s += sgl.assistant("To answer, I will use " + sgl.select("tool", ["the calculator", "nothing"]))
    if s["tool"] == "the calculator":
        s += sgl.user("Write the arithmetic expression to compute.")
        s += sgl.assistant(sgl.gen("expression", max_tokens=16, regex=r"[0-9]+ ?[-+*/] ?[0-9]+"))
        s += sgl.user(f"The calculator says {calculate(s['expression'])}. Now answer.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens))


def main(max_tokens=24):
    state = agent.run(question="What is 17 times 3?", max_tokens=max_tokens, temperature=0)
    for m in state.messages():
        print(m["role"], ":", m["content"])
    return state


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Runtime())
    main()
