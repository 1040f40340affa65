"""The whole notebook series on the smoke preset, through papermill, as CI and instructors run it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.notebooks


def finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from finite_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, EMO_KIT_RUNS=str(runs), OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-m", "emo_lib.run", "--preset", "smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    print(result.stdout[-5000:])
    print(result.stderr[-5000:], file=sys.stderr)
    assert result.returncode == 0, f"smoke series failed:\n{result.stderr[-3000:]}"
    return runs / "smoke", result


def test_every_notebook_was_executed(smoke_run):
    run, _ = smoke_run
    expected = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(p.name for p in (run / "executed").glob("*.ipynb")) == expected


def test_metrics_are_complete_and_finite(smoke_run):
    run, _ = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"00_tour", "01_data", "02_features", "03_align", "04_stage1", "05_tokens", "06_stage2", "07_demo",
            "08_evaluation", "09_variants", "run"} <= set(metrics)
    assert metrics["run"]["preset"] == "smoke" and "torch" in metrics["run"]["versions"]
    assert all(math.isfinite(x) for x in finite_numbers(metrics))
    data = metrics["01_data"]
    assert data["pairs_kept"] >= 40
    assert set(data["pairs_dropped_by_reason"]) >= {"query_wer", "response_wer"}
    assert data["pairs_kept"] + data["pairs_dropped"] == data["pairs_planned"]


def test_encoders_and_alignment(smoke_run):
    run, _ = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    features, aligned = metrics["02_features"], metrics["03_align"]
    assert 0.0 <= features["emotion_encoder_heldout_accuracy_queries"] <= 1.0
    assert features["ser_filter"]["checked_pairs"] > 0
    # DTW on real signals must beat splitting time by characters, even at smoke scale
    assert aligned["word_boundary_error_ms_dtw"] < aligned["word_boundary_error_ms_proportional"]
    assert aligned["no_gaps_word_boundary_error_ms_dtw"] < aligned["no_gaps_word_boundary_error_ms_proportional"]
    assert aligned["trajectories_written"] > 0
    for name in ("semantic", "emotion", "trajectories"):
        assert (run / "features" / f"{name}.npy").exists()
    assert (run / "checkpoints" / "emotion_encoder" / "latest.pt").exists()


def test_stage1_learns_and_is_evaluated(smoke_run):
    run, _ = smoke_run
    stage1 = json.loads((run / "metrics.json").read_text())["04_stage1"]
    assert stage1["val_ce_nats"] < stage1["val_ce_nats_before_training"] - 0.1  # 16 steps already lower held-out CE
    assert 0 < stage1["trainable_parameters"] < 0.2 * stage1["total_parameters"]
    for system in ("speech", "cascade", "oracle", "reference"):
        accuracy = stage1[f"same_text_judge_accuracy_{system}"]
        low, high = stage1[f"same_text_judge_ci_{system}"]
        assert 0.0 <= low <= accuracy <= high <= 1.0
    assert stage1["same_text_utterances"] > 0 and stage1["test_examples"] > 0
    assert -1.0 <= stage1["heldout_trajectory_cosine"] <= 1.0
    assert stage1["listening_replies"] > 0
    assert stage1["listening_gain_nats"] == pytest.approx(stage1["listening_ce_swapped"] - stage1["listening_ce_true"])
    assert (run / "checkpoints" / "stage1" / "latest.pt").exists()
    assert (run / "checkpoints" / "judge" / "judge.json").exists()
    assert (run / "stage1" / "same_text_replies.jsonl").exists()


def test_speech_tokens_and_token2mel_learn(smoke_run):
    run, _ = smoke_run
    tokens = json.loads((run / "metrics.json").read_text())["05_tokens"]
    assert tokens["unit_perplexity"] > 0.3 * tokens["n_units"]  # most units are in use
    assert tokens["nmi_unit_speaker"] < tokens["nmi_pitch_speaker"]  # units say less about the voice than pitch does
    assert tokens["token2mel_val_prior"] < 0.6 * tokens["token2mel_val_prior_before"]  # 40 steps already learn
    assert tokens["token2mel_val_flow"] < tokens["token2mel_val_flow_before"]
    assert tokens["stream_max_mel_difference"] < 1e-3  # chunked == offline
    for name in ("tokens.npy", "mels.npy"):
        assert (run / "tokens" / name).exists()
    assert (run / "checkpoints" / "token2mel" / "latest.pt").exists()


def test_stage2_learns_and_speaks_end_to_end(smoke_run):
    run, _ = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    stage2, demo = metrics["06_stage2"], metrics["07_demo"]
    assert stage2["val_unit_ce"] < stage2["val_unit_ce_before"] - 0.3
    assert stage2["e2e_spoken"] > 0 and 0.0 <= stage2["e2e_emotion_accuracy"] <= 1.0
    assert 0.0 <= stage2["e2e_plan_emotion_accuracy"] <= 1.0 and 0.0 <= stage2["e2e_emotion_accuracy_vs_plan"] <= 1.0
    assert 0.0 <= stage2["plan_reader_target_accuracy"] <= 1.0 and 0.0 <= stage2["plan_head_target_accuracy"] <= 1.0
    assert (run / "stage2" / "e2e_plans.npy").exists()  # the plans, for reading again without stage 1
    assert len(list((run / "stage2" / "e2e").glob("*.wav"))) == stage2["e2e_spoken"]
    assert demo["spoken"] > 0 and demo["first_audio_s_mean"] > 0
    assert 0.0 <= demo["stall_s_mean"] <= demo["stall_s_max"]
    assert len(list((run / "demo").glob("*_reply.wav"))) == demo["spoken"]


def test_manifest_and_wavs(smoke_run):
    run, _ = smoke_run
    rows = [json.loads(line) for line in (run / "data" / "manifest.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["kept"]]
    assert kept
    for r in kept:
        assert (run / r["query_wav"]).exists() and (run / r["response_wav"]).exists()
        assert r["query_wer"] is not None and "ser_query_label" in r
    assert any(r["response_word_boundaries"] for r in kept)
    assert {r["split"] for r in kept} >= {"train", "test"}
    assert (run / "env.json").exists()


def test_prosody_separates_emotions_even_in_smoke(smoke_run):
    run, _ = smoke_run
    by_emotion = json.loads((run / "metrics.json").read_text())["01_data"]["by_emotion"]
    rate = {e: v["mean_rate_words_per_s"] for e, v in by_emotion.items() if v["mean_rate_words_per_s"]}
    assert rate["sadness"] < rate["anger"]


def test_missing_input_names_the_notebook_to_run(smoke_run, tmp_path):
    env = dict(os.environ, EMO_KIT_RUNS=str(tmp_path), OMP_NUM_THREADS="2")
    code = ("from emo_lib import data; from emo_lib.paths import RunDir; "
            "data.load_manifest(RunDir('empty'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "01_data.ipynb" in result.stderr


def test_runner_reports_a_failing_notebook(smoke_run, tmp_path):
    env = dict(os.environ, EMO_KIT_RUNS=str(tmp_path), OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-m", "emo_lib.run", "--preset", "smoke", "--set", "data.colour=blue"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "data.colour" in result.stderr


def _within(entry: dict, key: str) -> bool:
    low, high = entry[f"{key}_ci"]
    return low - 1e-9 <= entry[key] <= high + 1e-9


def test_evaluation_tables_and_ablations_at_equal_budget(smoke_run):
    run, _ = smoke_run
    from emo_lib.presets import load_preset

    ev = load_preset("smoke")["evaluation"]
    evaluation = json.loads((run / "metrics.json").read_text())["08_evaluation"]
    for table in ("judge_same_text", "judge_emotional_test"):
        assert set(evaluation[table]) == {"speech model", "text-only cascade", "oracle", "dataset's reference replies"}
        for score in evaluation[table].values():
            assert score["ci"][0] <= score["mean"] <= score["ci"][1] and score["n"] > 0
    assert 1.0 <= evaluation["mos_e2e"] <= 5.0 and 1.0 <= evaluation["mos_recordings"] <= 5.0
    arms = evaluation["ablations"]
    assert set(arms) == {f"stage1/{a}" for a in ev["stage1_arms"]} | {f"stage2/{a}" for a in ev["stage2_arms"]}
    for name, entry in arms.items():
        assert entry["steps"] == ev[f"stage{name[5]}_arm_steps"]  # one equal budget per compared arm
        assert (run / "arms" / name.replace("/", "-") / "result.json").exists()
    for name in ev["stage2_arms"]:
        entry = arms[f"stage2/{name}"]
        assert _within(entry, "val_unit_accuracy") and _within(entry, "e2e_wer")
    for name in ev["stage1_arms"]:
        assert _within(arms[f"stage1/{name}"], "same_text_judge_accuracy")
    # without the fusion module the decoder cannot hear the emotion plan: a wrong plan changes nothing
    no_fusion = arms["stage2/no_fusion"]
    for kind in ("unit", "pitch", "energy"):
        assert abs(no_fusion[f"val_{kind}_accuracy_drop_wrong_emotion"]) < 1e-9


def test_variants_are_trained_and_compared_with_the_paper_arms(smoke_run):
    run, _ = smoke_run
    variants = json.loads((run / "metrics.json").read_text())["09_variants"]["variants"]
    assert {"stage1/paper", "stage1/dual_info", "stage2/paper", "stage2/interleaved_decoder"} <= set(variants)
    assert variants["stage2/interleaved_decoder"]["first_unit_after_tokens"] == 4  # reads 4 states before writing
    assert variants["stage2/paper"]["first_unit_after_tokens"] == 2  # one token + one token of lookahead
    assert variants["stage1/dual_info"]["steps"] == variants["stage1/paper"]["steps"]


def test_stage1_listening_benchmark_scores_the_run_and_a_transcription_arm(smoke_run):
    run, _ = smoke_run
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stage1_listening.py"), "--run", str(run),
                          "--arms", "transcribe", "--steps", "2", "--transcripts", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run's stage 1 (notebook 04)" in out.stdout and "arm transcribe" in out.stdout
    result = json.loads((run / "arms" / "stage1-transcribe" / "result.json").read_text())["result"]
    assert result["steps"] == 2 and result["overrides"] == {"stage1.transcribe_prob": 0.5}
    assert all(math.isfinite(result[k]) for k in ("listening_gain_nats", "same_text_content_score"))


def test_emotion_chain_benchmark_follows_replies_through_every_link(smoke_run):
    run, _ = smoke_run
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "emotion_chain.py"), "--run", str(run),
                          "--replies", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if " [" in line and line.split("  ")[0] in (
        "recording", "recording -> mel -> HiFi-GAN", "true tokens -> token2mel -> HiFi-GAN",
        "decoder (stage-1 plan) -> token2mel -> HiFi-GAN")]
    assert len(rows) == 4, out.stdout[-3000:]
    # the recordings themselves are what Whisper and the emotion encoder know best: WER far below 1
    recording_wer = float(rows[0].split()[1])
    assert recording_wer < 0.5, rows[0]
