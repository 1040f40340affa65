import numpy as np
import pytest
import torch

from emo_lib.content_probe import (
    ALPHABET,
    CTCProbe,
    ProbeError,
    char_ids,
    character_error_rate,
    evaluate_probe,
    fit_content_probe,
    greedy_ctc_decode,
    spelling,
)

WORDS = ["cat", "dog", "sun", "moon", "tree", "blue", "red", "sky"]


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) for _ in range(n)]


def spoken(text: str, rng: np.random.Generator, frames_per_char=(1, 3)) -> np.ndarray:
    """Token ids that say ``text``: each character's id held for 1-3 frames (like units held for a phone)."""
    ids = [ALPHABET.index(c) + 1 for c in spelling(text)]
    return np.repeat(ids, rng.integers(*frames_per_char, size=len(ids)) if ids else 0).astype(np.int64)


def test_spelling_ids_and_error_rate():
    assert spelling("I'm here, Bob! 3 cafés") == "im here bob cafs"  # digits and accented letters dropped
    assert char_ids("ab c").tolist() == [2, 3, 1, 4]
    assert character_error_rate("the cat", "the cat") == 0.0
    assert character_error_rate("the cat", "the bat") == pytest.approx(1 / 7)
    assert character_error_rate("", "") == 0.0 and character_error_rate("", "x") == 1.0


def test_greedy_decode_merges_repeats_and_drops_blanks():
    symbols = [2, 2, 0, 2, 3, 3, 0, 0, 1, 4]  # a a _ a b b _ _ ' ' c
    log_probs = torch.full((len(symbols) + 3, len(ALPHABET) + 1), -10.0)
    log_probs[torch.arange(len(symbols)), torch.tensor(symbols)] = 0.0
    assert greedy_ctc_decode(log_probs, len(symbols)) == "aab c"


def test_probe_learns_to_spell_tokens_that_say_the_words_and_not_noise():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train_texts, test_texts = sentences(300, 1), sentences(40, 2)
    train = [spoken(t, rng) for t in train_texts]
    test = [spoken(t, rng) for t in test_texts]
    probe = CTCProbe(vocab_sizes=[len(ALPHABET) + 1], hidden=48, layers=1, upsample=2)
    result = fit_content_probe(probe, train, train_texts, test, test_texts, steps=150, batch_size=16, lr=5e-3,
                               eval_every=50)
    assert result.cer < 0.15, result.transcripts[:3]
    assert result.history["eval_loss"][-1] < 0.5 * result.history["eval_loss"][0]
    # the control: ids unrelated to the words (same lengths) leave nothing to spell from
    noise = [rng.integers(1, len(ALPHABET) + 1, size=len(x)) for x in train]
    noise_test = [rng.integers(1, len(ALPHABET) + 1, size=len(x)) for x in test]
    control = CTCProbe(vocab_sizes=[len(ALPHABET) + 1], hidden=48, layers=1, upsample=2)
    blind = fit_content_probe(control, noise, train_texts, noise_test, test_texts, steps=150, batch_size=16,
                              lr=5e-3, eval_every=50)
    assert blind.cer > 0.5 and blind.cer > 4 * result.cer


def test_float_frames_are_standardised_and_the_fit_is_seeded():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    texts = sentences(60, 3)
    frames = [np.eye(len(ALPHABET) + 1, dtype=np.float32)[spoken(t, rng)] * 100 + 7 for t in texts]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the same initial weights, then the fit's own seed
        probe = CTCProbe(feature_dim=len(ALPHABET) + 1, hidden=16, layers=1)
        runs.append(fit_content_probe(probe, frames[:50], texts[:50], frames[50:], texts[50:], steps=10,
                                      batch_size=8, eval_every=5, seed=4))
    assert float(probe.mean.mean()) > 7 and float(probe.std.min()) > 0  # fitted on the training frames
    assert runs[0].history["loss"] == runs[1].history["loss"] and runs[0].cer == runs[1].cer
    cer, wer, transcripts, loss = evaluate_probe(probe, frames[50:], texts[50:])
    assert cer == runs[0].cer and len(transcripts) == 10 and loss > 0 and wer >= 0


def test_probe_errors_are_clear():
    with pytest.raises(ProbeError, match="exactly one"):
        CTCProbe()
    with pytest.raises(ProbeError, match="exactly one"):
        CTCProbe(feature_dim=4, vocab_sizes=[3])
    probe = CTCProbe(vocab_sizes=[5, 3], hidden=8, layers=1)
    with pytest.raises(ProbeError, match=r"stream 1: ids must be in \[0, 3\)"):
        probe.check(np.array([[1, 3]]))
    with pytest.raises(ProbeError, match="shape"):
        probe.check(np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ProbeError, match="non-integer"):
        probe.check(np.array([[1.5, 0.0]]))
    with pytest.raises(ProbeError, match=r"shape \(T, 4\)"):
        CTCProbe(feature_dim=4, hidden=8, layers=1).check(np.zeros((3, 5)))
    with pytest.raises(ProbeError, match="no training utterance"):
        fit_content_probe(probe, [np.zeros((3, 2), np.int64)], ["123"], [np.zeros((3, 2), np.int64)], ["a"])
