"""Ablation and variant arms: one preset override each, equal budgets, cached results, paired intervals."""
import numpy as np
import pytest

from emo_lib import experiments
from emo_lib.paths import RunDir, write_json_atomic
from emo_lib.presets import load_preset


def all_arms():
    return [arm for stage in (1, 2) for arm in experiments.ARMS[stage].values()]


def test_the_issue_arms_are_registered():
    assert {"paper", "interleaved_streams", "utterance_mean_target", "no_emotion_encoder", "dual_info"} <= set(experiments.ARMS[1])
    assert {"paper", "no_fusion", "fixed_mix", "no_voice", "interleaved_decoder"} <= set(experiments.ARMS[2])
    assert experiments.ARMS[2]["no_voice"].overrides == {"stage2.speaker": False}


@pytest.mark.parametrize("arm", all_arms(), ids=lambda a: f"stage{a.stage}-{a.name}")
def test_every_arm_is_one_valid_override_of_its_own_stage(arm):
    assert len(arm.overrides) <= 1  # one preset override per ablation or variant
    cfg = experiments.arm_preset("smoke", {}, arm, steps=7)
    assert cfg[f"stage{arm.stage}"]["steps"] == 7
    base = load_preset("smoke")
    for key, value in arm.overrides.items():
        section, name = key.split(".")
        assert cfg[section][name] == value != base[section][name]


def test_arm_values_name_registered_classes():
    from emo_lib import adapters
    from emo_lib import decoder as D

    for arm in all_arms():
        for key, value in arm.overrides.items():
            if key == "stage1.adapter":
                assert value in adapters.ADAPTERS
            if key == "stage2.decoder":
                assert value in D.decoder_names()


def test_presets_list_only_registered_arms():
    for preset in ("smoke", "cpu", "gpu", "paper"):
        ev = load_preset(preset)["evaluation"]
        for name in ev["stage1_arms"]:
            experiments.get_arm(name, 1)
        for name in ev["stage2_arms"]:
            experiments.get_arm(name, 2)
        for name in ev["variants"]:
            experiments.find_arm(name)


def test_register_arm_refuses_another_stages_keys_and_unknown_names_are_listed():
    with pytest.raises(ValueError, match="changes its own stage"):
        experiments.register_arm("bad", 1, {"stage2.fusion": "none"}, "crosses stages")
    with pytest.raises(ValueError, match="registered: .*no_fusion"):
        experiments.get_arm("nope", 2)


def test_paired_interval_is_narrower_when_items_vary_together():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(size=200)
    a = difficulty + 0.3 + 0.1 * rng.normal(size=200)
    b = difficulty + 0.1 * rng.normal(size=200)
    paired = experiments.paired_difference(a, b, seed=0)
    alone = experiments.per_item_ci(a, seed=0)
    assert paired["ci"][0] <= paired["mean"] <= paired["ci"][1]
    assert paired["ci"][0] > 0  # the 0.3 shift is found
    assert paired["ci"][1] - paired["ci"][0] < 0.5 * (alone["ci"][1] - alone["ci"][0])
    with pytest.raises(ValueError, match="same items"):
        experiments.paired_difference([1, 2], [1, 2, 3])


def test_shuffled_emotions_swap_plans_and_keep_lengths():
    items = [{"durations": np.ones(n, dtype=int), "emotion_pred": np.full((n, 3), float(i)), "emotion_gt": np.zeros((n, 3))}
             for i, n in enumerate((3, 5, 2, 4))]
    wrong = experiments.shuffled_emotions(items, seed=1)
    assert [len(w["emotion_pred"]) for w in wrong] == [3, 5, 2, 4]
    assert all(w["emotion_pred"][0, 0] != x["emotion_pred"][0, 0] for w, x in zip(wrong, items))  # never its own plan
    assert all(np.array_equal(w["emotion_gt"], w["emotion_pred"]) for w in wrong)


def test_other_voices_give_every_item_a_voice_not_its_own():
    voices = [np.full(4, float(k), dtype=np.float32) for k in range(3)]
    items = [{"speaker": voices[i % 3], "pitch": np.arange(i)} for i in range(9)]
    wrong = experiments.other_voices(items, seed=2)
    assert all(not np.array_equal(w["speaker"], x["speaker"]) for w, x in zip(wrong, items))
    assert all(any(np.array_equal(w["speaker"], v) for v in voices) for w in wrong)
    assert all(w["pitch"] is x["pitch"] for w, x in zip(wrong, items))  # everything else is the item's own
    assert len({w["speaker"].tobytes() for w in wrong}) >= 2
    with pytest.raises(ValueError, match="two distinct voices"):
        experiments.other_voices([{"speaker": voices[0]}, {"speaker": voices[0].copy()}])


def test_results_are_reused_only_with_the_same_settings(tmp_path):
    run = RunDir("r", root=tmp_path).make()
    arm = experiments.get_arm("no_fusion", 2)
    folder = experiments.arm_folder(run, arm)
    settings = experiments._settings(arm, 10, {"train": 5})
    write_json_atomic(folder / "result.json", {"settings": settings, "result": {"arm": "no_fusion", "x": 1}})
    assert experiments._cached(folder, settings) == {"arm": "no_fusion", "x": 1}
    assert experiments._cached(folder, experiments._settings(arm, 11, {"train": 5})) is None


def test_arm_results_depend_on_the_frozen_models_and_the_run_overrides(tmp_path):
    import torch

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert experiments.model_fingerprint(a) == experiments.model_fingerprint(a)
    assert experiments.model_fingerprint(a) != experiments.model_fingerprint(b)  # e.g. a retrained token2mel
    run = RunDir("r", root=tmp_path).make()
    plain = experiments._open_arm(run, "smoke", {}, "no_fusion", 2, 10, {"train": 5}, False)[3]
    assert "base_overrides" not in plain  # results saved before the key existed stay valid
    variant = experiments._open_arm(run, "smoke", {"token2mel.encoder": "conv"}, "no_fusion", 2, 10, {"train": 5},
                                    False)[3]
    assert variant["base_overrides"] == {"token2mel.encoder": "conv"} and variant != plain


def test_metrics_entry_keeps_scalars_and_intervals_only():
    result = {"arm": "paper", "steps": 3, "acc": {"mean": 0.5, "ci": [0.4, 0.6], "n": 10}, "items": [1, 0], "texts": ["a"]}
    entry = experiments.metrics_entry(result)
    assert entry == {"arm": "paper", "steps": 3, "acc": 0.5, "acc_ci": [0.4, 0.6]}
    row = experiments.summary_row({**result, "origin": "paper", "what": "x"})
    assert row["acc"] == 0.5 and row["acc 95% CI"] == "0.400-0.600"


def test_reference_replies_match_by_pair_id_or_by_sentence_emotion_speaker():
    manifest = [
        {"pair_id": "a", "split": "test", "source": "same_text", "kept": True, "query_text": "They called.",
         "query_emotion": "anger", "query_speaker": "m5", "response_text": "I'm sorry."},
        {"pair_id": "b", "split": "test", "source": "same_text", "kept": True, "query_text": "They called.",
         "query_emotion": "happiness", "query_speaker": "m5", "response_text": "Great news!"},
        {"pair_id": "c", "split": "train", "source": "same_text", "kept": True, "query_text": "They called.",
         "query_emotion": "anger", "query_speaker": "m1", "response_text": "Train reply."},
    ]
    rows = [{"sentence": "They called.", "query emotion": "happiness", "speaker": "m5"},
            {"pair_id": "a", "sentence": "ignored", "query emotion": "x", "speaker": "y"}]
    assert experiments.reference_replies(manifest, rows) == ["Great news!", "I'm sorry."]
    with pytest.raises(ValueError, match="0 same-text test pairs match"):
        experiments.reference_replies(manifest, [{"sentence": "They called.", "query emotion": "anger", "speaker": "m1"}])
