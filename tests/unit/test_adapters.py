"""Stage-1 speech adapters: the registry, shapes and masks, padding, replacement, targets, training, resume."""
import math

import numpy as np
import pytest
import torch

from emo_lib import adapters as A
from emo_lib import llm as L
from emo_lib import train as T
from tiny_models import tiny_llm  # tests/unit/tiny_models.py; the tokenizer fixture is in conftest.py

DS, DE, H, K = 12, 6, 32, 3
NAMES = ["dual_info", "fused", "interleaved", "semantic_only"]


def adapter(name, seed=0):
    torch.manual_seed(seed)
    return A.build_adapter(name, DS, DE, H, soft_prompt_length=K).eval()


def frames(lengths, seed=0):
    """Right-padded random 50 Hz streams of the given lengths and their mask."""
    g = torch.Generator().manual_seed(seed)
    t50 = max(lengths)
    semantic, emotion = torch.randn(len(lengths), t50, DS, generator=g), torch.randn(len(lengths), t50, DE, generator=g)
    mask = torch.arange(t50)[None] < torch.tensor(lengths)[:, None]
    return semantic, emotion, mask


def expected_length(name, t50):
    t10 = math.ceil(t50 / 5)
    return {"fused": t10, "semantic_only": t10, "interleaved": 2 * t10, "dual_info": K + t10}[name]


def test_registry_lists_the_four_adapters_and_rejects_unknown_names():
    assert sorted(A.ADAPTERS) == NAMES
    with pytest.raises(ValueError, match="unknown speech adapter 'conformer'.*dual_info.*fused.*interleaved.*semantic_only"):
        A.build_adapter("conformer", DS, DE, H)
    with pytest.raises(ValueError, match="soft_prompt_lenght"):
        A.build_adapter("fused", DS, DE, H, soft_prompt_lenght=4)
    with pytest.raises(ValueError, match="adapter must be one of"):
        L.Stage1Config(adapter="conformer")
    assert A.ADAPTERS["semantic_only"].uses_emotion is False
    assert all(A.ADAPTERS[n].uses_emotion for n in ("fused", "interleaved", "dual_info"))
    assert [n for n in NAMES if A.ADAPTERS[n].supports_replacement] == ["dual_info"]


def test_fused_keeps_the_speech_projector_state_dict_keys():
    from emo_lib.encoders import SpeechProjector

    fused = adapter("fused")
    old = SpeechProjector(DS, DE, H)
    assert list(fused.state_dict()) == list(old.state_dict())
    fused.load_state_dict(old.state_dict())  # an old checkpoint's projector loads as is
    s, e, m = frames([17, 9])
    torch.testing.assert_close(fused(s, e, m)[0], old.eval()(s, e, m)[0])


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_mask(name):
    s, e, m = frames([23, 11])
    out, mask = adapter(name)(s, e, m)
    n = expected_length(name, 23)
    assert out.shape == (2, n, H) and mask.shape == (2, n) and mask.dtype == torch.bool
    assert mask[0].all()
    assert mask[1].sum() == expected_length(name, 11)
    assert mask[1, : int(mask[1].sum())].all()  # a prefix mask: the splice cuts each row at its sum
    assert float(out[1][~mask[1]].detach().abs().sum()) == 0.0  # padded positions are zero


def test_interleaved_alternates_the_two_streams():
    model = adapter("interleaved")
    s, e, m = frames([23, 11])
    out, mask = model(s, e, m)
    sem, sem_mask = model.semantic_adapter(s, m)
    emo, _ = model.emotion_adapter(e, m)
    torch.testing.assert_close(out[:, 0::2], model.semantic_project(sem) * sem_mask[..., None])
    torch.testing.assert_close(out[:, 1::2], model.emotion_project(emo) * sem_mask[..., None])
    assert mask[1].tolist() == [True] * 6 + [False] * 4  # 3 semantic/emotion pairs, then padding
    assert (mask[:, 0::2] == mask[:, 1::2]).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_valid_outputs(name):
    model = adapter(name)
    s, e, m = frames([23, 11], seed=1)
    out, mask = model(s, e, m)
    for i, n in enumerate([23, 11]):
        alone, alone_mask = model(s[i : i + 1, :n], e[i : i + 1, :n], m[i : i + 1, :n])
        valid = int(alone_mask.sum())
        assert int(mask[i].sum()) == valid
        torch.testing.assert_close(out[i, :valid], alone[0, :valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, changes", [("semantic_only", False), ("fused", True), ("interleaved", True), ("dual_info", True)])
def test_only_semantic_only_ignores_the_emotion_frames(name, changes):
    model = adapter(name)
    s, e, m = frames([20])
    before = model(s, e, m)[0]
    after = model(s, e + 2.0 * torch.randn_like(e), m)[0]
    assert (not torch.allclose(before, after)) == changes


def test_dual_info_replacement_puts_the_text_in_place_and_keeps_the_soft_prompt():
    model = adapter("dual_info")
    s, e, m = frames([23, 11])
    text = torch.randn(7, H)
    plain, plain_mask = model(s, e, m)
    out, mask = model(s, e, m, replace=[None, text])
    torch.testing.assert_close(out[:, :K], plain[:, :K])  # the soft prompt: unchanged
    torch.testing.assert_close(out[1, K : K + 7], text)  # the transcript instead of the speech
    assert mask[1].sum() == K + 7 and not mask[1, K + 7 :].any()
    torch.testing.assert_close(out[0, : int(plain_mask[0].sum())], plain[0, : int(plain_mask[0].sum())])
    with pytest.raises(ValueError, match="no equivalence replacement"):
        adapter("fused")(s, e, m, replace=[None, text])
    adapter("fused")(s, e, m, replace=[None, None])  # nothing to replace: accepted


def test_dual_info_soft_prompt_has_fixed_length_whatever_the_duration():
    model = adapter("dual_info")
    for t50 in (3, 40, 101):
        out, mask = model(*frames([t50]))
        assert out.shape[1] == K + math.ceil(t50 / 5) and mask.all()


# ---------------------------------------------------------------------------------------------
# Inside the speech LLM
# ---------------------------------------------------------------------------------------------
def tiny_model(tokenizer, seed=0, **overrides):
    config = L.Stage1Config(semantic_dim=DS, emotion_dim=DE, head_width=16, head_layers=1, head_heads=2,
                            soft_prompt_length=K, **overrides)
    torch.manual_seed(seed)
    return L.build_speech_llm(config, tiny_llm(tokenizer, seed), tokenizer)


def example(tokenizer, pair_id="p", seconds=1.0, text="I am so sorry to hear that.", seed=0, query="They lost my bag."):
    rng = np.random.default_rng(seed)
    t50 = int(seconds * 50)
    ids = L.response_token_ids(tokenizer, text)
    return L.Stage1Example(pair_id, rng.normal(size=(t50, DS)).astype(np.float32), rng.normal(size=(t50, DE)).astype(np.float32),
                           ids, rng.normal(size=(len(ids), DE)).astype(np.float32),
                           list(tokenizer(query, add_special_tokens=False)["input_ids"]))


@pytest.mark.parametrize("name", NAMES)
def test_speech_llm_splices_each_adapter(tokenizer, name):
    model = tiny_model(tokenizer, adapter=name).eval()
    examples = [example(tokenizer, "a", 1.0), example(tokenizer, "b", 2.3, seed=1)]
    batch = model.splice(examples)
    assert batch.speech_frames == [expected_length(name, 50), expected_length(name, 115)]
    assert list(model.projector.state_dict()) == list(model.trainable_state()["projector"])


def test_semantic_only_model_accepts_examples_without_emotion_frames(tokenizer):
    model = tiny_model(tokenizer, adapter="semantic_only").eval()
    e = example(tokenizer)
    bare = L.Stage1Example(e.pair_id, e.semantic, None, e.response_ids, e.trajectory)
    wrong_width = L.Stage1Example(e.pair_id, e.semantic, np.zeros((3, 99), np.float32), e.response_ids, e.trajectory)
    with torch.no_grad():
        ref = model([e])["emotion"]
        torch.testing.assert_close(model([bare])["emotion"], ref)
        torch.testing.assert_close(model([wrong_width])["emotion"], ref)


def test_replacement_only_in_training_mode(tokenizer):
    model = tiny_model(tokenizer, adapter="dual_info", replacement_prob=1.0)
    e = example(tokenizer, "a", 1.0)
    text = model.embed_tokens(torch.tensor(e.query_ids))
    model.train()
    speech, mask = model.speech_embeddings([e], replacement=True)
    assert int(mask.sum()) == K + len(e.query_ids)
    torch.testing.assert_close(speech[0, K:], text)
    assert model.splice([e], replacement=True).speech_frames == [K + len(e.query_ids)]
    # forward replaces in training mode, never in eval mode; generation never
    assert model.splice([e]).speech_frames == [K + 10]
    model.eval()
    with torch.no_grad():
        assert model.splice([e], replacement=model.training).speech_frames == [K + 10]
    model.train()
    spy = []
    original = model.projector.forward
    model.projector.forward = lambda *a, replace=None: spy.append(replace) or original(*a, replace=replace)
    model([e])
    model.generate([e], max_new_tokens=2)
    model.eval()
    model([e])
    assert spy[0] is not None and spy[1] is None and spy[2] is None
    # other adapters ignore replacement_prob (the base preset sets 0.3 for every adapter)
    fused = tiny_model(tokenizer, replacement_prob=1.0).train()
    assert fused.splice([e], replacement=True).speech_frames == [10]


def test_utterance_mean_targets_are_constant_in_the_loss_but_evaluation_uses_dtw(tokenizer):
    examples = [example(tokenizer, "a", 1.0), example(tokenizer, "b", 1.4, seed=1, text="Oh no!")]
    dtw = tiny_model(tokenizer).eval()
    mean = tiny_model(tokenizer, emotion_target="utterance_mean").eval()
    batch = mean.splice(examples)
    for i, e in enumerate(examples):
        n = len(e.response_ids)
        rows = batch.loss_targets[i, :n]
        torch.testing.assert_close(rows, torch.as_tensor(e.trajectory).mean(0).expand(n, -1))
        assert float(batch.loss_targets[i, n:].abs().sum()) == 0.0
        torch.testing.assert_close(batch.targets[i, :n], torch.as_tensor(e.trajectory))  # DTW kept
    torch.testing.assert_close(dtw.splice(examples).loss_targets, dtw.splice(examples).targets)
    with torch.no_grad():
        assert not torch.isclose(mean(examples)["mse"], dtw(examples)["mse"])  # the training losses differ...
        torch.testing.assert_close(mean(examples)["targets"], dtw(examples)["targets"])
    a, b = L.evaluate_teacher_forced(dtw, examples), L.evaluate_teacher_forced(mean, examples)
    for key in ("trajectory_cosine", "centered_cosine", "mse", "one_minus_cos"):  # ...evaluation does not
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    with torch.no_grad():
        out = dtw(examples)
    assert a["mse"] == pytest.approx(float(out["mse"]), rel=1e-4)  # for DTW: the loss terms themselves
    with pytest.raises(ValueError, match="emotion_target"):
        L.Stage1Config(emotion_target="frame")


def _loss_fn(model, batch):
    return model(batch)


@pytest.mark.parametrize("name, extra", [("fused", {}), ("interleaved", {}), ("semantic_only", {}), ("dual_info", {}),
                                          ("dual_info", {"replacement_prob": 0.5}),
                                          ("fused", {"emotion_target": "utterance_mean"})])
def test_each_adapter_learns_a_tiny_set(tokenizer, name, extra):
    items = [example(tokenizer, f"p{i}", 0.6, seed=i, text=t) for i, t in enumerate(["Oh no, I am sorry.", "Wow, great news!"])]
    cfg = {"steps": 20, "batch_size": 2, "warmup_steps": 2, "lr": {"lora": 5e-3, "adapters": 5e-3}, "eval_every": 100}
    model = tiny_model(tokenizer, adapter=name, **extra)
    history = T.train_loop(model, model.parameter_groups(), items, _loss_fn, cfg, None, progress=False)
    first, last = (lambda k: np.mean(history[k][:3])), (lambda k: np.mean(history[k][-3:]))
    assert last("loss") < first("loss") - 0.5  # CE over a 49k vocabulary moves slowly through LoRA alone
    assert last("one_minus_cos") < 0.7 * first("one_minus_cos")


def test_a_checkpoint_without_the_new_keys_loads_as_fused(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    payload = L.checkpoint_payload(model)
    for key in ("adapter", "emotion_target", "soft_prompt_length", "replacement_prob"):
        del payload["config"][key]
    path = T.save_checkpoint(tmp_path / "old.pt", payload)
    loaded = L.load_stage1(path, llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    assert loaded.config.adapter == "fused" and loaded.config.emotion_target == "dtw"
    e = [example(tokenizer, "a")]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(e)["emotion"], loaded(e)["emotion"])
    L.check_checkpoint_config(payload["config"], model.config, path)  # missing adapter = fused: accepted
    with pytest.raises(T.CheckpointError, match="adapter = 'fused'.*adapter = 'dual_info'"):
        L.check_checkpoint_config(payload["config"], tiny_model(tokenizer, adapter="dual_info").config, path)


def test_config_from_preset_reads_the_new_keys():
    from emo_lib.presets import load_preset

    cfg = load_preset("cpu")
    cfg["stage1"].update(adapter="dual_info", emotion_target="utterance_mean", soft_prompt_length=6, replacement_prob=0.3)
    config = L.config_from_preset(cfg, DS, DE)
    assert (config.adapter, config.emotion_target, config.soft_prompt_length, config.replacement_prob) == \
        ("dual_info", "utterance_mean", 6, 0.3)
    for key in ("adapter", "emotion_target", "soft_prompt_length", "replacement_prob"):
        del cfg["stage1"][key]
    config = L.config_from_preset(cfg, DS, DE)
    assert (config.adapter, config.emotion_target, config.replacement_prob) == ("fused", "dtw", 0.0)


def test_resuming_with_another_adapter_is_refused(tokenizer, tmp_path):
    items = [example(tokenizer, f"p{i}", 0.5, seed=i) for i in range(4)]
    cfg = {"steps": 1, "batch_size": 2, "warmup_steps": 1}
    model = tiny_model(tokenizer)
    T.train_loop(model, model.parameter_groups(), items, _loss_fn, cfg, tmp_path, payload_fn=L.checkpoint_payload,
                 progress=False)
    other = tiny_model(tokenizer, adapter="interleaved")

    def check(payload, path):
        L.check_checkpoint_config(payload["config"], other.config, path)

    with pytest.raises(T.CheckpointError, match="adapter = 'fused'.*adapter = 'interleaved'"):
        T.train_loop(other, other.parameter_groups(), items, _loss_fn, {**cfg, "steps": 2}, tmp_path,
                     payload_fn=L.checkpoint_payload, check_resume=check, progress=False)
