"""Few-shot classification with `select`: each label is scored as a continuation of the shared
few-shot prompt, and `run_batch` prefills that prompt once for the whole batch.

Usage: python examples/few_shot_select.py
"""

import sgl_adapters.lang as sgl  # with SGLang: import sglang as sgl

SHOTS = (
    "Classify the sentiment of each review.\n\n"
    "Review: I loved this movie, it was wonderful.\nSentiment: positive\n\n"
    "Review: Terrible acting and a boring plot.\nSentiment: negative\n\n"
    "Review: A delightful story with great characters.\nSentiment: positive\n\n"
    "Review: I walked out, it was awful.\nSentiment: negative\n\n"
)


@sgl.function
def classify(s, review):
    s += SHOTS + "Review: " + review + "\nSentiment: "
    s += sgl.select("sentiment", choices=["positive", "negative"])


def main():
    reviews = [
        "What a wonderful, beautiful film. I loved it.",
        "Awful. Boring and terrible from start to end.",
    ]
    states = classify.run_batch([{"review": r} for r in reviews], temperature=0)
    return [s["sentiment"] for s in states]


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Runtime())
    print(main())
