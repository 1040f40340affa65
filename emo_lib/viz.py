"""Plots and audio players for the notebooks (matplotlib/seaborn; labelled axes with units)."""
from __future__ import annotations

import numpy as np

EMOTION_COLORS = {
    "neutral": "#8c8c8c", "happiness": "#f2b701", "anger": "#d62728", "fear": "#9467bd",
    "sadness": "#1f77b4", "disgust": "#2ca02c", "surprise": "#ff7f0e",
}


def draw_architecture(ax=None):
    """The Emotion Omni architecture as a block diagram."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(13, 6.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    boxes = {
        "wav": (0.1, 2.8, 1.3, 0.8, "query\nspeech", "#eeeeee"),
        "sem": (1.9, 4.0, 2.0, 0.8, "semantic encoder\n(Whisper, frozen)", "#cfe2f3"),
        "emo": (1.9, 1.6, 2.0, 0.8, "emotion encoder\n(frozen)", "#f4cccc"),
        "ds1": (4.3, 4.0, 1.7, 0.8, "conv adapter\n50 Hz -> 10 Hz", "#d9ead3"),
        "ds2": (4.3, 1.6, 1.7, 0.8, "conv adapter\n50 Hz -> 10 Hz", "#d9ead3"),
        "cat": (6.4, 2.8, 1.5, 0.8, "concat per frame\n+ Linear", "#d9ead3"),
        "llm": (8.3, 2.6, 1.8, 1.2, "LLM + LoRA\n(stage 1)", "#fff2cc"),
        "txt": (10.6, 4.7, 2.2, 0.8, "response text\ntokens", "#eeeeee"),
        "head": (10.6, 3.4, 2.2, 0.8, "emotion head\none vector / token", "#f4cccc"),
        "dec": (10.6, 1.9, 2.2, 0.9, "speech decoder (stage 2)\ngate + AdaLN, 6 blocks", "#d0e0e3"),
        "t2w": (10.6, 0.3, 2.2, 1.0, "units -> mel (flow\nmatching) -> HiFi-GAN", "#d0e0e3"),
        "out": (8.3, 0.45, 1.8, 0.7, "spoken reply\n(streamed)", "#eeeeee"),
    }
    for key, (x, y, w, h, label, color) in boxes.items():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="#444444"))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)

    def arrow(a, b, text=None):
        xa, ya, wa, ha = boxes[a][:4]
        xb, yb, wb, hb = boxes[b][:4]
        start, end = (xa + wa, ya + ha / 2), (xb, yb + hb / 2)
        if xb < xa:
            start, end = (xa, ya + ha / 2), (xb + wb, yb + hb / 2)
        if abs(xa - xb) < 0.01:
            start, end = (xa + wa / 2, ya), (xb + wb / 2, yb + hb)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#444444"))
        if text:
            ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, fontsize=8, ha="center")

    for a, b in [("wav", "sem"), ("wav", "emo"), ("sem", "ds1"), ("emo", "ds2"), ("ds1", "cat"), ("ds2", "cat"),
                 ("cat", "llm"), ("llm", "txt"), ("llm", "head"), ("llm", "dec"), ("txt", "head"),
                 ("head", "dec"), ("dec", "t2w"), ("t2w", "out")]:
        arrow(a, b)
    ax.set_title("Emotion Omni: hear how the user feels, answer with fitting words and voice", fontsize=12)
    return ax


def emotion_palette(emotions) -> list[str]:
    return [EMOTION_COLORS.get(e, "#333333") for e in emotions]


def count_heatmap(rows: list[dict], ax=None):
    """Kept pairs per (domain, query emotion)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="domain", columns="query_emotion", values="pair_id", aggfunc="count", fill_value=0)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.3 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt="d", cmap="Blues", cbar_kws={"label": "kept pairs"}, ax=ax)
    ax.set_xlabel("query emotion")
    ax.set_ylabel("domain")
    ax.set_title("Kept query-response pairs per domain and emotion")
    return ax


def acoustics_by_emotion(rows: list[dict], role: str = "query"):
    """Box plots of F0, F0 range, speaking rate and energy by emotion: do the profiles differ?"""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from .corpus import EMOTIONS

    records = [{"emotion": r[f"{role}_emotion"], **r[f"{role}_acoustics"]} for r in rows if r.get(f"{role}_acoustics")]
    frame = pd.DataFrame(records)
    order = [e for e in EMOTIONS if e in set(frame["emotion"])]
    panels = [("f0_mean_hz", "mean F0 (Hz)"), ("f0_range_semitones", "F0 range, 5-95 % (semitones)"),
              ("rate_words_per_s", "speaking rate (words/s)"), ("energy_db", "energy (dBFS)")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (column, label) in zip(axes, panels):
        sns.boxplot(data=frame, x="emotion", y=column, order=order, hue="emotion", hue_order=order,
                    palette=emotion_palette(order), legend=False, ax=ax, fliersize=1.5)
        ax.set_xlabel("")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"Acoustics of the {role} speech by emotion (espeak-ng prosody profiles with jitter)")
    fig.tight_layout()
    return fig


def wer_histogram(rows: list[dict], threshold: float, ax=None):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for role, color in (("query", "#1f77b4"), ("response", "#ff7f0e")):
        values = [r[f"{role}_wer"] for r in rows if r.get(f"{role}_wer") is not None]
        ax.hist(np.clip(values, 0, 1.0), bins=np.linspace(0, 1.0, 26), alpha=0.6, color=color, label=role)
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold}")
    ax.set_xlabel("Whisper tiny.en word error rate (clipped at 1)")
    ax.set_ylabel("utterances")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("ASR filter: WER of every synthesized utterance")
    return ax


def waveform_with_words(wav: np.ndarray, sr: int, boundaries: list[dict], ax=None):
    """Waveform with the exact word boundaries of word-by-word synthesis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 2.8))
    t = np.arange(len(wav)) / sr
    ax.plot(t, wav, lw=0.5, color="#444444")
    for i, b in enumerate(boundaries):
        ax.axvspan(b["start_s"], b["end_s"], color="C0" if i % 2 else "C1", alpha=0.15)
        ax.text((b["start_s"] + b["end_s"]) / 2, 0.9 * np.abs(wav).max(), b["word"], ha="center", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("amplitude")
    ax.set_title("Word-by-word synthesis: exact word boundaries")
    return ax


def audio_player(wav: np.ndarray | str, sr: int | None = None, label: str = ""):
    """An inline player (IPython.display.Audio), with a caption."""
    from IPython.display import HTML, Audio, display

    if label:
        display(HTML(f"<b>{label}</b>"))
    if isinstance(wav, str):
        display(Audio(filename=wav))
    else:
        display(Audio(np.asarray(wav), rate=sr))
