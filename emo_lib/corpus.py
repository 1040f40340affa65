"""The text corpus: hand-written queries, the same-text set, and LLM-written responses.

Queries live in ``data/queries/<domain>.jsonl`` (20 domains x 6 emotions + neutral, 15 each) and
``data/same_text.jsonl`` (emotionally ambiguous sentences, spoken later with every emotion).

Responses follow BLSP-Emo's self-distillation: the backbone LLM itself answers each query, prompted
with the query AND its emotion label, so that the stage-1 targets stay in the model's own
distribution. Each response gets its own emotion label from ``RESPONSE_EMOTION`` (an angry user gets
an apologetic, sorrowful reply; a happy one a joyful reply). They are generated once and committed
as ``data/responses.jsonl``; runs read that file. Regenerate with
``python -m emo_lib.corpus generate-responses``, then
``python -m emo_lib.corpus refine-same-text``: the committed same-text replies are the greedy reply or
one of 8 sampled ones, whichever a judge trained on the domain replies reads as carrying the wanted
emotion most clearly (``refine_same_text`` says why).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import re
import time
from pathlib import Path

import numpy as np

from .paths import find_repo_root, read_jsonl, write_jsonl_atomic

EMOTIONS = ("neutral", "happiness", "anger", "fear", "sadness", "disgust", "surprise")
QUERY_EMOTIONS = EMOTIONS[1:]
DOMAINS = (
    "work", "family", "health", "school", "travel", "money", "friendship", "romance", "home", "pets",
    "hobbies", "sports", "food", "technology", "shopping", "neighborhood", "commute", "weather",
    "entertainment", "celebrations",
)

# query emotion -> (response emotion label, how the reply should sound). The label is what the reply
# is spoken with and what the response-emotion judge must recognize.
RESPONSE_EMOTION = {
    "happiness": ("happiness", "share their joy: warm, cheerful, celebrating with them"),
    "surprise": ("surprise", "share their amazement: lively and curious"),
    "sadness": ("sadness", "comfort them: gentle, soft and sorrowful"),
    "anger": ("sadness", "apologize and sympathize: sorry, calm and understanding"),
    "fear": ("neutral", "reassure them: calm, steady and practical"),
    "disgust": ("disgust", "share their distaste: agree that it is unpleasant"),
    "neutral": ("neutral", "answer plainly and helpfully"),
}
EMOTION_ADJECTIVE = {
    "happiness": "happy", "surprise": "surprised", "sadness": "sad", "anger": "angry",
    "fear": "scared", "disgust": "disgusted", "neutral": "calm",
}

SYSTEM_PROMPT = (
    "You are a caring friend talking on the phone. Reply with one or two short, warm sentences "
    "that fit how the person feels."
)
# Few-shot turns, one per emotion, written by hand: a 135M model follows examples far better than
# instructions. The tag "(angry)" is how the emotion label reaches the model.
FEW_SHOT = (
    ("happiness", "My sister is getting married next spring!",
     "That's wonderful news! I'm so happy for your sister, what a beautiful celebration that will be."),
    ("anger", "The delivery company lost my package again.",
     "I'm really sorry, that is so frustrating. You deserve better, let's get it sorted out."),
    ("fear", "I have a job interview tomorrow and my hands are shaking.",
     "It's okay to feel nervous. Take a slow breath, you've prepared well and you can do this."),
    ("sadness", "My old dog passed away this morning.",
     "I'm so sorry for your loss. He was lucky to have you, and it's okay to grieve."),
    ("disgust", "Someone left rotten food in the shared fridge.",
     "Ugh, that sounds really gross. I'd be disgusted too, nobody should have to deal with that."),
    ("surprise", "They called me back about the apartment.",
     "Oh wow, really? That's unexpected! What did they say?"),
    ("neutral", "What time does the library open on weekends?",
     "Most libraries open around nine or ten on weekends, but it's best to check their website."),
)

SPEAKABLE = re.compile(r"^[A-Za-z0-9 ,.!?'\-]+$")


class CorpusError(ValueError):
    """A corpus file that breaks the corpus rules."""


def data_dir() -> Path:
    return find_repo_root() / "data"


def load_queries(folder: Path | None = None, domains=None) -> list[dict]:
    """All hand-written queries: dicts with id, domain, emotion, text (validated)."""
    folder = Path(folder or data_dir()) / "queries"
    chosen = DOMAINS if domains in (None, "all") else tuple(domains)
    unknown = set(chosen) - set(DOMAINS)
    if unknown:
        raise CorpusError(f"unknown domains {sorted(unknown)}; valid: {', '.join(DOMAINS)}")
    rows = []
    for domain in chosen:
        path = folder / f"{domain}.jsonl"
        if not path.exists():
            raise CorpusError(f"missing query file {path}")
        per_emotion: dict[str, int] = {}
        for row in read_jsonl(path):
            if row.get("domain") != domain or row.get("emotion") not in EMOTIONS:
                raise CorpusError(f"{path}: bad row {row}")
            k = per_emotion.get(row["emotion"], 0)
            per_emotion[row["emotion"]] = k + 1
            rows.append({"id": f"{domain}-{row['emotion']}-{k:02d}", "domain": domain,
                         "emotion": row["emotion"], "text": row["text"].strip()})
    return rows


def load_same_text(folder: Path | None = None) -> list[dict]:
    """The same-text set: ambiguous sentences with id, domain, text."""
    path = Path(folder or data_dir()) / "same_text.jsonl"
    rows = read_jsonl(path)
    if len({r["id"] for r in rows}) != len(rows):
        raise CorpusError(f"{path}: duplicate ids")
    return rows


def response_key(text: str, emotion: str) -> str:
    """Stable id of a (query text, query emotion) prompt, used to join responses to queries."""
    return hashlib.sha1(f"{emotion}|{text}".encode()).hexdigest()[:12]


def chat_messages(text: str, emotion: str | None) -> list[dict]:
    """The chat that asks the backbone for an empathetic reply to ``text`` said with ``emotion``.

    ``emotion=None`` gives the same chat with every "(angry)"-style tag removed, the few-shot
    turns' too: the prompt of a text-only cascade, which knows the words but not how they sounded.
    """
    def tagged(emo: str | None, words: str) -> str:
        return words if emo is None or emotion is None else f"({EMOTION_ADJECTIVE[emo]}) {words}"

    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for shot_emotion, query, reply in FEW_SHOT:
        messages.append({"role": "user", "content": tagged(shot_emotion, query)})
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": tagged(emotion, text)})
    return messages


_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
                 "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten", "24": "twenty four"}


def clean_reply(raw: str, max_sentences: int = 2, max_words: int = 32) -> str:
    """First one or two sentences of a generated reply, as speakable plain text ('' if unusable)."""
    text = raw.strip().split("\n")[0].strip().strip('"').strip()
    text = text.replace("\u2019", "'").replace("\u2014", ", ").replace(";", ",").replace(":", ",")
    text = re.sub(r"\b(\d+)-(\d+)\b", r"\1 to \2", text)
    text = re.sub(r"\b\d+\b", lambda m: _NUMBER_WORDS.get(m.group(0), m.group(0)), text)
    sentences = re.findall(r"[^.!?]+[.!?]+", text)
    if not sentences:
        return ""
    text = " ".join(s.strip() for s in sentences[:max_sentences])
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    if len(words) > max_words or len(words) < 3 or not SPEAKABLE.match(text) or re.search(r"\d", text):
        return ""
    return text


def reply_problem(reply: str, query: str) -> str | None:
    """Why a cleaned reply is unusable, or None: empty/unspeakable, or mostly echoing the query."""
    if not reply:
        return "empty or unspeakable"
    q = set(re.findall(r"[a-z']+", query.lower()))
    r = set(re.findall(r"[a-z']+", reply.lower()))
    if r and len(q & r) / len(r) > 0.7:
        return "echoes the query"
    return None


def _prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = 0
    while all(len(s) > n and s[n] == first[n] for s in sequences):
        n += 1
    return n


def generate_replies(model, tokenizer, items: list[dict], batch_size: int = 24, max_new_tokens: int = 40,
                     sample_seed: int | None = None, progress: bool = True, messages_fn=None) -> list[str]:
    """Raw replies for items {text, emotion}. Greedy when ``sample_seed`` is None.

    ``messages_fn(text, emotion) -> messages`` builds each chat (default ``chat_messages``).

    The system prompt and few-shot turns are identical for every item, so their keys and values are
    computed once and shared (a prefix KV cache): only each query's own tokens are run through the
    model before decoding. Output equals uncached generation.
    """
    import torch
    from tqdm.auto import tqdm

    prompts = [
        tokenizer(tokenizer.apply_chat_template((messages_fn or chat_messages)(it["text"], it["emotion"]),
                                                add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False).input_ids
        for it in items
    ]
    shared = _prefix_length(prompts + [prompts[0][:-1]]) if len(prompts) > 1 else len(prompts[0]) - 1
    prefix = torch.tensor([prompts[0][:shared]])
    with torch.inference_mode():
        prefix_cache = model(input_ids=prefix, use_cache=True).past_key_values
    replies: list[str] = []
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, len(items), batch_size), desc="replies", disable=not progress):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) - shared for p in chunk)
        ids = torch.full((len(chunk), shared + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            tail = p[shared:]
            ids[i, :shared] = prefix[0]
            ids[i, shared + width - len(tail):] = torch.tensor(tail)
            mask[i, :shared] = 1
            mask[i, shared + width - len(tail):] = 1
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(chunk))
        kwargs = dict(do_sample=False)
        if sample_seed is not None:
            torch.manual_seed(sample_seed + start)
            kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=max_new_tokens, repetition_penalty=1.1,
                                 pad_token_id=pad, **kwargs)
        replies += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return replies


def response_requests(folder: Path | None = None) -> list[dict]:
    """Every (text, emotion) that needs a reply: all queries, and each same-text sentence x emotion."""
    requests = [{"text": q["text"], "emotion": q["emotion"], "source": "domain"} for q in load_queries(folder)]
    for s in load_same_text(folder):
        for emotion in EMOTIONS:
            requests.append({"text": s["text"], "emotion": emotion, "source": "same_text"})
    for r in requests:
        r["key"] = response_key(r["text"], r["emotion"])
    return requests


def generate_response_file(out: Path, llm_source: str, retries: int = 3, limit: int | None = None,
                           batch_size: int = 24) -> list[dict]:
    """Generate, clean and validate a reply for every request; retry failures with sampling."""
    import torch

    from .pretrained import load_llm

    torch.manual_seed(0)
    model, tokenizer = load_llm(llm_source)
    requests = response_requests()[:limit]
    raw = generate_replies(model, tokenizer, requests, batch_size=batch_size)
    results = {}
    for req, text in zip(requests, raw):
        reply = clean_reply(text)
        results[req["key"]] = (reply, reply_problem(reply, req["text"]), "greedy")
    for attempt in range(retries):
        _mark_repeats(requests, results)
        todo = [r for r in requests if results[r["key"]][1] is not None]
        if not todo:
            break
        print(f"retry {attempt + 1}: {len(todo)} replies failed the checks; sampling new ones")
        raw = generate_replies(model, tokenizer, todo, batch_size=batch_size, sample_seed=1000 * (attempt + 1))
        for req, text in zip(todo, raw):
            reply = clean_reply(text)
            results[req["key"]] = (reply, reply_problem(reply, req["text"]), f"sample{attempt + 1}")
    rows = []
    for req in requests:
        reply, problem, how = results[req["key"]]
        response_emotion, tone = RESPONSE_EMOTION[req["emotion"]]
        rows.append({"key": req["key"], "source": req["source"], "query_text": req["text"],
                     "query_emotion": req["emotion"], "response_text": reply,
                     "response_emotion": response_emotion, "tone": tone, "decoding": how,
                     "problem": problem})
    write_jsonl_atomic(out, rows)
    return rows


def _mark_repeats(requests: list[dict], results: dict, max_repeats: int = 3) -> None:
    """Greedy decoding falls back on a few stock replies; keep each at most ``max_repeats`` times."""
    seen: dict[str, int] = {}
    for req in requests:
        reply, problem, how = results[req["key"]]
        if problem is None:
            seen[reply] = seen.get(reply, 0) + 1
            if seen[reply] > max_repeats:
                results[req["key"]] = (reply, "repeated reply", how)


def pick_by_emotion(candidates: list[list[str]], queries: list[str], wanted: list[str], labels: list[str],
                    probabilities, max_repeats: int = 3) -> list[tuple[int, float]]:
    """For each request, the candidate reply that best carries the wanted emotion.

    ``candidates[i]`` are cleaned replies to ``queries[i]``; ``probabilities`` is a function
    ``texts -> (n, len(labels))`` array (a text emotion judge). A candidate is eligible when
    ``reply_problem`` finds nothing and it has not already been picked ``max_repeats`` times (in
    request order); among the eligible ones the highest probability of ``wanted[i]`` wins, ties
    going to the earlier candidate. Returns ``(index, probability)`` per request, ``(-1, 0.0)``
    when no candidate is eligible.
    """
    if not (len(candidates) == len(queries) == len(wanted)):
        raise ValueError(f"{len(candidates)} candidate lists, {len(queries)} queries, {len(wanted)} wanted emotions")
    flat = [text for texts in candidates for text in texts]
    table = np.asarray(probabilities(flat)) if flat else np.zeros((0, len(labels)))
    used: dict[str, int] = {}
    picks, offset = [], 0
    for texts, query, emotion in zip(candidates, queries, wanted):
        column = labels.index(emotion)
        best = (-1, 0.0)
        for j, text in enumerate(texts):
            p = float(table[offset + j, column])
            if reply_problem(text, query) is None and used.get(text, 0) < max_repeats and (best[0] < 0 or p > best[1]):
                best = (j, p)
        if best[0] >= 0:
            used[texts[best[0]]] = used.get(texts[best[0]], 0) + 1
        picks.append(best)
        offset += len(texts)
    return picks


def refine_same_text(path: Path, llm_source: str, samples: int = 8, batch_size: int = 24,
                     limit: int | None = None) -> tuple[list[dict], int]:
    """Re-choose the same-text replies of ``path`` (data/responses.jsonl) for how clearly they carry their emotion.

    Why: on an ambiguous sentence ("They called me back about the job.") the small backbone's greedy
    reply is often generic whatever the emotion tag, so the emotion a fitting reply must show is
    hardly in the text (the kit's judge recognizes it in about a third of them against four fifths of
    the domain replies). For every same-text request the greedy reply and ``samples`` sampled ones
    compete; a judge trained on the *domain* replies only (their emotion is readable; the same-text
    replies are what is being chosen) picks the one most likely to show the wanted reply emotion
    (``pick_by_emotion``). Domain rows are left as they are. Rewrites ``path`` atomically and returns
    the rows and how many same-text replies a sampled candidate replaced.
    """
    from .evaluate import EmbeddingJudge
    from .pretrained import load_llm

    rows = read_jsonl(path)
    domain = [r for r in rows if r["source"] == "domain" and r["problem"] is None]
    judge = EmbeddingJudge(seed=0).fit([r["response_text"] for r in domain], [r["response_emotion"] for r in domain])
    todo = [r for r in rows if r["source"] == "same_text"][:limit]
    model, tokenizer = load_llm(llm_source)
    requests = [{"text": r["query_text"], "emotion": r["query_emotion"]} for r in todo]
    candidates = [[r["response_text"]] for r in todo]  # the greedy reply competes too
    for k in range(samples):
        raw = generate_replies(model, tokenizer, requests, batch_size=batch_size, sample_seed=10_000 * (k + 1))
        for texts, text in zip(candidates, raw):
            texts.append(clean_reply(text))
    picks = pick_by_emotion(candidates, [r["query_text"] for r in todo], [r["response_emotion"] for r in todo],
                            list(judge.labels), judge.predict_proba)
    replaced = 0
    for row, texts, (index, p) in zip(todo, candidates, picks):
        replaced += index > 0
        if index < 0:
            row["problem"] = "no usable candidate"
            continue
        row["response_text"], row["problem"] = texts[index], None
        row["decoding"] = f"best of {len(texts)} by a domain-reply judge (p = {p:.2f}; 0 = greedy, chose {index})"
    write_jsonl_atomic(path, rows)
    return rows, replaced


def load_responses(folder: Path | None = None) -> dict[str, dict]:
    """The committed responses keyed by ``response_key`` (rows with a problem are kept, flagged)."""
    path = Path(folder or data_dir()) / "responses.jsonl"
    if not path.exists():
        raise CorpusError(f"{path} is missing: run `python -m emo_lib.corpus generate-responses`")
    return {r["key"]: r for r in read_jsonl(path)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Corpus tools")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate-responses", help="write data/responses.jsonl with the backbone LLM")
    gen.add_argument("--llm", default="packaged:smollm2-135m-instruct")
    gen.add_argument("--out", default=str(data_dir() / "responses.jsonl"))
    gen.add_argument("--limit", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=24)
    refine = sub.add_parser("refine-same-text", help="re-choose the same-text replies for how clearly they carry their emotion")
    refine.add_argument("--llm", default="packaged:smollm2-135m-instruct")
    refine.add_argument("--file", default=str(data_dir() / "responses.jsonl"))
    refine.add_argument("--samples", type=int, default=8)
    refine.add_argument("--limit", type=int, default=None)
    refine.add_argument("--batch-size", type=int, default=24)
    args = parser.parse_args(argv)
    started = time.time()
    if args.command == "refine-same-text":
        _, replaced = refine_same_text(Path(args.file), args.llm, samples=args.samples, batch_size=args.batch_size,
                                       limit=args.limit)
        print(f"{replaced} same-text replies replaced by a sampled candidate; {args.file} rewritten "
              f"in {time.time() - started:.0f} s")
        return
    rows = generate_response_file(Path(args.out), args.llm, limit=args.limit, batch_size=args.batch_size)
    bad = sum(r["problem"] is not None for r in rows)
    print(f"wrote {len(rows)} responses ({bad} still failing the checks) to {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
