#!/usr/bin/env python3
"""Generate the labelled requests for automatic task routing (`task_auto`, docs/routing.md):

  task_examples/sentiment.jsonl  the classifier's examples, {"text", "match"}: sentiment requests (match) and
                                 requests that must stay on the LLM (general chat; generation requests that
                                 mention sentiment, e.g. "write a positive review of ...")
  ../../../loadtests/data/task_mix.jsonl
                                 the test mix of `python -m loadtests.task_routing`, {"text", "kind", "task",
                                 "label", "max_tokens"}: never used as examples

Nothing of the test mix is seen by the classifier: its sentiment requests wrap the reviews of
sentiment.jsonl's held-out split (the examples use the train split) in phrasings the examples never use,
and its chat and generation requests come from other templates and topics. Many sentiment phrasings do
not contain the word "sentiment". Synthetic, hand-written templates, fixed seed: re-running reproduces
both files byte for byte.

Run:  python deploy/local/data/make_task_data.py
"""
import json
import random
from pathlib import Path

SEED = 20261204
HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "task_examples" / "sentiment.jsonl"
MIX = HERE.parent.parent.parent / "loadtests" / "data" / "task_mix.jsonl"

# ---- sentiment requests: {r} is a review text
SENTIMENT_TRAIN = [
    "Classify the sentiment of this review as positive or negative.\n\nReview: {r}",
    "Is the following review positive or negative?\n{r}",
    "Sentiment analysis: {r}",
    "{r}\n\nWas this customer happy or unhappy? Answer positive or negative.",
    'Label this product review as positive or negative: "{r}"',
    "What's the sentiment here? {r}",
    "Determine whether the author liked it or not: {r}",
    "Review: {r}\nSentiment:",
    "Does this review express a positive or a negative opinion? {r}",
    "Read this feedback and tell me if it is good or bad: {r}",
    "{r}\nPositive or negative review?",
    "Customer feedback: {r}\nIs the tone positive or negative?",
    "Was the person who wrote this pleased or disappointed? {r}",
    "Classify: {r}",
    "Opinion mining. Text: {r}\nPolarity (positive/negative):",
    "Decide if this comment is favourable or unfavourable: {r}",
]
SENTIMENT_TEST = [
    "Would you say this review is positive or negative? {r}",
    "{r}\nIs the reviewer satisfied? Reply with positive or negative.",
    "Please classify the following customer comment by sentiment (positive/negative):\n{r}",
    "Tag the tone of this review as positive or negative.\n\n{r}",
    'Here is a review: "{r}" Did the writer like it? Answer positive or negative.',
    "Positive or negative? {r}",
    "Rate the polarity of this text as positive or negative: {r}",
    "How does the customer feel in this review, positive or negative? {r}",
]

# ---- general chat: {a} / {b} from the topic lists
CHAT_TRAIN = [
    "What is the capital of {country}?", "Explain how {thing} works.", "Give me a recipe for {food}.",
    "Translate 'good morning, my friend' into {language}.", "Write a Python function that {code}.",
    "What are the health benefits of {food}?", "Summarize the history of {country} in three sentences.",
    "How do I learn {language} quickly?", "What is the difference between {thing} and a {thing2}?",
    "Tell me a joke about {thing}.",
]
CHAT_TEST = [
    "Who invented the {thing}?", "Can you recommend a good book about {country}?", "Write a haiku about {food}.",
    "Plan a three-day trip to {country}.", "How many people speak {language}?",
    "Write a SQL query that {code}.", "Why is {food} popular in {country}?", "Describe a {thing} to a child.",
]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "India", "Mexico", "Egypt", "Vietnam"]
THINGS = ["refrigerator", "bicycle", "telescope", "microwave", "printer", "compass", "thermostat", "camera",
          "steam engine", "wind turbine"]
FOODS = ["lentil soup", "sourdough bread", "green tea", "dark chocolate", "kimchi", "oatmeal", "tacos",
         "paella", "hummus", "blueberries"]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Portuguese", "Swahili", "Korean", "Dutch"]
CODE = ["reverses a string", "checks whether a number is prime", "merges two sorted lists",
        "counts the words in a file", "finds duplicate rows", "computes a moving average"]

# ---- generation requests that mention sentiment or reviews: must stay on the LLM
# {s} a subject, {r} a review text
GENERATION_TRAIN = [
    "Write a positive review of {s}.", "Write a negative review of {s} for my blog.",
    "Compose a glowing five-star review for {s}.", "Draft an angry one-star review about {s}.",
    "Write a tweet with a positive sentiment about {s}.", "Explain what sentiment analysis is and how it works.",
    "Generate ten example reviews of {s}, half positive and half negative.",
    "Rewrite this review so it sounds more positive: {r}",
    "Summarize this review in five words: {r}", "Fix the grammar of this review: {r}",
    "Continue this review with two more sentences: {r}", "Write a response to this customer: {r}",
    "Turn this review into a funny limerick: {r}", "Translate this review into German: {r}",
    "Make this review more formal: {r}", "Write the opposite of this review: {r}",
]
GENERATION_TEST = [
    "Please write an enthusiastic customer review for {s}.", "Compose a harsh critique of {s}.",
    "Write a short story in which a customer leaves a negative review of {s}.",
    "How do companies use sentiment analysis on product reviews?",
    "Make this review sound less negative: {r}", "Write a polite reply from the manager to this review: {r}",
    "Translate this review into Spanish: {r}", "Write a poem with a happy mood about {s}.",
]
SUBJECTS = ["the new phone", "a pizza place downtown", "the hotel by the lake", "my new headphones",
            "the latest superhero movie", "a coffee shop", "the museum tour", "the rental car", "a hiking trail",
            "the airline", "this laptop", "a sushi restaurant"]


def reviews(split: str) -> list[dict]:
    rows = [json.loads(line) for line in (HERE / "sentiment.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def chat_text(rng: random.Random, tpl: str) -> str:
    return tpl.format(country=rng.choice(COUNTRIES), thing=rng.choice(THINGS), thing2=rng.choice(THINGS),
                      food=rng.choice(FOODS), language=rng.choice(LANGUAGES), code=rng.choice(CODE))


def build(rng: random.Random, sentiment_tpl: list[str], chat_tpl: list[str], gen_tpl: list[str],
          review_rows: list[dict], n_sentiment: int, n_chat: int, n_gen: int) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()

    def add(text: str, **kw: object) -> bool:
        if text in seen:
            return False
        seen.add(text)
        rows.append({"text": text, **kw})
        return True

    picked = rng.sample(review_rows, min(n_sentiment, len(review_rows)))
    for i, r in enumerate(picked):
        add(sentiment_tpl[i % len(sentiment_tpl)].format(r=r["text"]), kind="sentiment", task="sentiment",
            label=r["label"], max_tokens=4)
    for kind, templates, n, tokens in (("chat", chat_tpl, n_chat, 24), ("generation", gen_tpl, n_gen, 24)):
        made = tries = 0
        while made < n and tries < 100 * n:
            tpl = templates[tries % len(templates)]
            tries += 1
            text = chat_text(rng, tpl) if kind == "chat" else tpl.format(s=rng.choice(SUBJECTS),
                                                                          r=rng.choice(review_rows)["text"])
            made += add(text, kind=kind, task=None, label=None, max_tokens=tokens)
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(SEED)
    train = build(rng, SENTIMENT_TRAIN, CHAT_TRAIN, GENERATION_TRAIN, reviews("train"), 240, 100, 160)
    test = build(rng, SENTIMENT_TEST, CHAT_TEST, GENERATION_TEST, reviews("heldout"), 120, 40, 40)
    EXAMPLES.parent.mkdir(exist_ok=True)
    with EXAMPLES.open("w", encoding="utf-8") as f:
        for r in train:
            f.write(json.dumps({"text": r["text"], "match": r["task"] == "sentiment", "kind": r["kind"]},
                               ensure_ascii=False) + "\n")
    with MIX.open("w", encoding="utf-8") as f:
        for r in test:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    overlap = {r["text"] for r in train} & {r["text"] for r in test}
    assert not overlap, overlap
    print(f"wrote {len(train)} examples to {EXAMPLES} and a test mix of {len(test)} to {MIX}")


if __name__ == "__main__":
    main()
