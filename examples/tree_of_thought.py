"""Tree of thought with fork/join: branch into several lines of reasoning from one shared
prefix, let the model judge each branch, and continue from the one it accepts.

Usage: python examples/tree_of_thought.py
"""

import sgl_adapters.lang as sgl  # with SGLang: import sglang as sgl


@sgl.function
def tree_of_thought(s, question, num_branches=3, max_tokens=24):
    s += "Question: " + question + "\n"
    forks = s.fork(num_branches)
    for i in range(num_branches):
        forks[i] += f"Idea {i + 1}:" + sgl.gen("thought", max_tokens=max_tokens, stop="\n")
        forks[i] += "\nIs this idea correct? " + sgl.select("verdict", ["yes", "no"])
    forks.join()

    verdicts = s["verdict"]
    best = verdicts.index("yes") if "yes" in verdicts else 0
    s += "Reasoning:" + s["thought"][best] + "\n"
    s += "So the answer is" + sgl.gen("answer", max_tokens=max_tokens, stop="\n")


def main(max_tokens=24):
    state = tree_of_thought.run(
        question="What is 12 plus 30?", max_tokens=max_tokens, temperature=0
    )
    return {"thoughts": state["thought"], "verdicts": state["verdict"], "answer": state["answer"]}


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Runtime())
    print(main())
