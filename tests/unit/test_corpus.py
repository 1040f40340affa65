import re
from collections import Counter

import pytest

from emo_lib import corpus


def test_queries_cover_every_domain_and_emotion():
    rows = corpus.load_queries()
    cells = Counter((r["domain"], r["emotion"]) for r in rows)
    assert len(corpus.DOMAINS) == 20
    for domain in corpus.DOMAINS:
        for emotion in corpus.EMOTIONS:
            assert cells[(domain, emotion)] >= 15, (domain, emotion)


def test_query_text_is_speakable_and_unique():
    rows = corpus.load_queries()
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    for text in texts:
        assert text.isascii() and not re.search(r"\d", text), text
        assert 5 <= len(text.split()) <= 24, text
        assert text[-1] in ".!?", text


def test_same_text_set():
    rows = corpus.load_same_text()
    assert len(rows) >= 40
    assert {r["domain"] for r in rows} <= set(corpus.DOMAINS)
    assert len({r["text"] for r in rows}) == len(rows)


def test_committed_responses_cover_every_request():
    responses = corpus.load_responses()
    requests = corpus.response_requests()
    missing = [r for r in requests if r["key"] not in responses]
    assert not missing, f"{len(missing)} requests have no response; regenerate data/responses.jsonl"
    usable = [responses[r["key"]] for r in requests if responses[r["key"]]["problem"] is None]
    assert len(usable) >= 0.9 * len(requests)
    for row in usable:
        assert row["response_emotion"] == corpus.RESPONSE_EMOTION[row["query_emotion"]][0]
        assert corpus.clean_reply(row["response_text"]) == row["response_text"]


def test_responses_depend_on_the_emotion():
    """Self-distillation must give different replies to the same sentence said with different emotions."""
    responses = corpus.load_responses()
    for sentence in corpus.load_same_text()[:10]:
        replies = {responses[corpus.response_key(sentence["text"], e)]["response_text"] for e in corpus.EMOTIONS}
        assert len(replies) >= 4, sentence["text"]


@pytest.mark.parametrize("raw, expected", [
    ('"That\'s wonderful! I\'m so happy for you. Tell me more about it."', "That's wonderful! I'm so happy for you."),
    ("Take it slow.\n\nHere is a list:", "Take it slow."),
    ("You need 2-3 days of rest.", "You need two to three days of rest."),
    ("Dear Sarah", ""),
    ("Ok \U0001F600 fine.", ""),
])
def test_clean_reply(raw, expected):
    assert corpus.clean_reply(raw) == expected


def test_echo_is_a_problem():
    assert corpus.reply_problem("They approved my request to work from home.", "They approved my request to work from home!") == "echoes the query"
    assert corpus.reply_problem("", "x") == "empty or unspeakable"
    assert corpus.reply_problem("Congratulations, that is great news.", "They approved my request.") is None


def test_prompt_carries_the_emotion_label():
    messages = corpus.chat_messages("They called me back.", "anger")
    assert messages[0]["role"] == "system"
    assert messages[-1] == {"role": "user", "content": "(angry) They called me back."}
    assert len(messages) == 2 + 2 * len(corpus.FEW_SHOT)


def test_pick_by_emotion_takes_the_most_fitting_usable_candidate():
    labels = ["happiness", "sadness"]
    happy = {"Great news, I'm so glad for you.": 0.9, "Oh no, I'm so sorry to hear that.": 0.1,
             "Okay, that is a thing that happened.": 0.5}
    proba = lambda texts: [[happy.get(t, 0.5), 1 - happy.get(t, 0.5)] for t in texts]  # noqa: E731
    candidates = [["Okay, that is a thing that happened.", "Great news, I'm so glad for you.", ""],
                  ["Okay, that is a thing that happened.", "Oh no, I'm so sorry to hear that."],
                  ["They called me back about the job.", "Great news, I'm so glad for you."]]
    queries = ["They called me back about the job."] * 3
    picks = corpus.pick_by_emotion(candidates, queries, ["happiness", "sadness", "sadness"], labels, proba)
    assert picks[0] == (1, 0.9)            # the happiest of the usable ones ("" is unusable)
    assert picks[1] == (1, 0.9)            # sadness: the sorry reply
    assert picks[2] == (1, pytest.approx(0.1))  # the echo of the query is refused, whatever its score
    # a reply already picked max_repeats times is not picked again
    again = corpus.pick_by_emotion([["Great news, I'm so glad for you.", "Okay, that is a thing that happened."]] * 2,
                                   queries[:2], ["happiness"] * 2, labels, proba, max_repeats=1)
    assert again == [(0, 0.9), (1, 0.5)]
    assert corpus.pick_by_emotion([[""]], queries[:1], ["happiness"], labels, proba) == [(-1, 0.0)]
    with pytest.raises(ValueError):
        corpus.pick_by_emotion([[""]], queries, ["happiness"], labels, proba)
