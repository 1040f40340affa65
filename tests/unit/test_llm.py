"""Stage 1 with tiny random LLMs: splicing, masking, LoRA, the emotion head, losses, resume."""
import numpy as np
import pytest
import torch

from emo_lib import llm as L
from emo_lib import train as T
from tiny_models import tiny_llm  # tests/unit/tiny_models.py; the tokenizer fixture is in conftest.py


def tiny_model(tokenizer, seed=0, **overrides):
    config = L.Stage1Config(semantic_dim=12, emotion_dim=6, head_width=16, head_layers=1, head_heads=2, **overrides)
    torch.manual_seed(seed)
    return L.build_speech_llm(config, tiny_llm(tokenizer, seed), tokenizer)


def example(tokenizer, pair_id="p", seconds=1.0, text="I am so sorry to hear that.", seed=0, trajectory=True):
    rng = np.random.default_rng(seed)
    t50 = int(seconds * 50)
    ids = L.response_token_ids(tokenizer, text)
    return L.Stage1Example(pair_id, rng.normal(size=(t50, 12)).astype(np.float32), rng.normal(size=(t50, 6)).astype(np.float32),
                           ids, rng.normal(size=(len(ids), 6)).astype(np.float32) if trajectory else None)


def test_prompt_pieces_wrap_the_speech_in_the_chat_template(tokenizer):
    before, after = L.prompt_pieces(tokenizer, "Be kind.")
    assert tokenizer.decode(before).endswith("<|im_start|>user\n")
    assert "Be kind." in tokenizer.decode(before)
    assert tokenizer.decode(after) == "<|im_end|>\n<|im_start|>assistant\n"
    assert L.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_labels_are_masked_everywhere_but_the_response(tokenizer):
    model = tiny_model(tokenizer)
    examples = [example(tokenizer, "a", 1.0), example(tokenizer, "b", 2.3, text="Congratulations, that is great news!")]
    batch = model.splice(examples)
    for i, e in enumerate(examples):
        labelled = (batch.labels[i] != -100).nonzero().flatten().tolist()
        expected = list(e.response_ids) + [model.end_id]
        assert batch.labels[i, labelled].tolist() == expected  # the reply and <|im_end|>, nothing else
        prompt = len(model.prefix_ids) + batch.speech_frames[i] + len(model.suffix_ids)
        assert labelled == list(range(prompt, prompt + len(expected)))  # contiguous, right after the prompt
        assert batch.attention_mask[i].sum() == prompt + len(expected)  # right padding only after
        assert batch.response_positions[i, : len(e.response_ids)].tolist() == labelled[:-1]
    assert batch.speech_frames == [10, 23]  # 10 Hz: ceil(frames / 5)


def test_only_lora_projector_and_head_receive_gradients(tokenizer):
    model = tiny_model(tokenizer)
    out = model([example(tokenizer, "a"), example(tokenizer, "b", 1.7, seed=1)])
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing learned"
    for name in with_grad:
        assert "lora_" in name or name.startswith(("projector.", "head.")), name
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n and not n.startswith(("projector.", "head."))]
    assert frozen and all(not dict(model.named_parameters())[n].requires_grad for n in frozen)
    counts = L.count_trainable(model)
    assert counts["trainable"] == counts["lora"] + counts["adapters"] < counts["total"]


def test_emotion_loss_is_zero_for_identical_vectors_and_ignores_masked_tokens():
    target = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mse, cos = L.emotion_losses(target.clone(), target, mask)
    assert float(mse) == pytest.approx(0.0, abs=1e-7) and float(cos) == pytest.approx(0.0, abs=1e-6)
    noisy = target.clone()
    noisy[0, 3:] += 100.0  # masked tokens: no effect
    assert float(sum(L.emotion_losses(noisy, target, mask))) == pytest.approx(0.0, abs=1e-6)
    mse, cos = L.emotion_losses(-target, target, mask)
    assert float(cos) == pytest.approx(2.0, abs=1e-5) and float(mse) > 0
    assert float(L.stage1_loss(torch.tensor(1.0), mse, cos, 0.5)) == pytest.approx(1.0 + 0.5 * float(mse + cos))


def test_missing_trajectory_gives_no_emotion_target(tokenizer):
    model = tiny_model(tokenizer)
    batch = model.splice([example(tokenizer, "a"), example(tokenizer, "b", trajectory=False)])
    assert batch.target_mask[0].any() and not batch.target_mask[1].any()
    bad = example(tokenizer, "c")
    bad.trajectory = bad.trajectory[:-1]
    with pytest.raises(ValueError, match="trajectory vectors"):
        model.splice([bad])


def test_over_long_speech_is_truncated_or_rejected_by_policy(tokenizer):
    long = example(tokenizer, "long", seconds=3.0)
    cut, was_cut = L.limit_speech(long, 2.0, "truncate")
    assert was_cut and len(cut.semantic) == len(cut.emotion) == 100
    assert L.limit_speech(long, 5.0, "truncate")[1] is False
    with pytest.raises(ValueError, match="longer than max_speech_s"):
        L.limit_speech(long, 2.0, "reject")
    model = tiny_model(tokenizer, max_speech_s=1.0)
    assert model.splice([long, example(tokenizer, "short", 0.5)]).speech_frames == [10, 5]
    with pytest.raises(ValueError, match="over_long"):
        L.Stage1Config(over_long="drop")


def test_emotion_head_is_causal():
    head = L.EmotionHead(16, 6, width=16, layers=2, heads=2, dropout=0.0).eval()
    x = torch.randn(1, 7, 16)
    mask = torch.ones(1, 7, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4:] += 3.0
    torch.testing.assert_close(head(x, mask)[0, :4], head(changed, mask)[0, :4])
    assert not torch.allclose(head(x, mask)[0, 4:], head(changed, mask)[0, 4:])


def test_generation_hidden_states_match_teacher_forcing(tokenizer):
    """Left-padded batched generation must see what a teacher-forced pass sees: same positions, same states."""
    model = tiny_model(tokenizer).eval()
    examples = [example(tokenizer, "a", 0.6), example(tokenizer, "b", 2.1, seed=3)]
    outs = model.generate(examples, max_new_tokens=6, repetition_penalty=1.0)
    for e, out in zip(examples, outs):
        assert len(out["token_ids"]) == len(out["hidden"]) == len(out["emotion"]) > 0
        assert out["emotion"].shape[1] == 6
        forced = L.Stage1Example(e.pair_id, e.semantic, e.emotion, out["token_ids"], None)
        with torch.no_grad():
            ref = model([forced])
        n = len(out["token_ids"])
        np.testing.assert_allclose(out["hidden"], ref["hidden"][0, :n].numpy(), atol=2e-4)
        np.testing.assert_allclose(out["emotion"], ref["emotion"][0, :n].numpy(), atol=2e-4)


def test_response_states_are_what_generation_hands_to_stage_2(tokenizer):
    """Stage 2 trains on teacher-forced states; at inference it gets generate()'s: they must agree."""
    model = tiny_model(tokenizer).eval()
    examples = [example(tokenizer, "a", 0.6), example(tokenizer, "b", 2.1, seed=3)]
    outs = model.generate(examples, max_new_tokens=6, repetition_penalty=1.0)
    forced = [L.Stage1Example(e.pair_id, e.semantic, e.emotion, o["token_ids"], None) for e, o in zip(examples, outs)]
    states = L.response_states(model, forced, batch_size=2)
    for e, out, st in zip(examples, outs, states):
        assert st["pair_id"] == e.pair_id
        np.testing.assert_allclose(st["hidden"], out["hidden"], atol=2e-3)  # float16 storage
        np.testing.assert_allclose(st["emotion"], out["emotion"], atol=2e-3)
        expected = model.embed_tokens(torch.tensor(out["token_ids"])).detach().numpy()
        np.testing.assert_allclose(st["embeds"], expected, atol=2e-3)


def test_train_loop_tells_a_loss_fn_the_step_when_it_asks(tokenizer):
    seen = []

    def loss_fn(model, batch, step):
        seen.append(step)
        return model(batch)

    model = tiny_model(tokenizer)
    items = [example(tokenizer, f"p{i}", 0.5, seed=i) for i in range(4)]
    T.train_loop(model, model.parameter_groups(), items, loss_fn, {"steps": 3, "batch_size": 2, "warmup_steps": 1},
                 progress=False)
    assert seen == [0, 1, 2]


def _loss_fn(model, batch):
    return model(batch)


def test_resume_gives_the_same_next_loss_as_an_uninterrupted_run(tokenizer, tmp_path):
    items = [example(tokenizer, f"p{i}", 0.5 + 0.1 * i, seed=i) for i in range(8)]
    cfg = {"steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 100}

    def run(folder, stop_after=None):
        model = tiny_model(tokenizer)
        return T.train_loop(model, model.parameter_groups(), items, _loss_fn, cfg, folder, payload_fn=L.checkpoint_payload,
                            lengths=[len(i.semantic) for i in items], progress=False, stop_after=stop_after)

    full = run(tmp_path / "full")
    run(tmp_path / "resumed", stop_after=2)  # "interrupted" after step 2 (its checkpoint is written)
    resumed = run(tmp_path / "resumed")
    assert resumed["step"] == [1, 2, 3, 4]
    np.testing.assert_allclose(resumed["loss"], full["loss"], rtol=1e-5)


def test_training_fits_a_tiny_set(tokenizer):
    items = [example(tokenizer, f"p{i}", 0.6, seed=i, text=t) for i, t in enumerate(["Oh no, I am sorry.", "Wow, great news!"])]
    cfg = {"steps": 30, "batch_size": 2, "warmup_steps": 2, "lr": {"lora": 5e-3, "adapters": 5e-3}, "eval_every": 100}
    model = tiny_model(tokenizer)
    history = T.train_loop(model, model.parameter_groups(), items, _loss_fn, cfg, None, progress=False)
    assert history["ce"][-1] < history["ce"][0] - 0.25  # a random tiny LLM moves slowly through LoRA alone
    assert history["one_minus_cos"][-1] < 0.5 * history["one_minus_cos"][0]


def test_resuming_with_another_lora_rank_is_refused(tokenizer, tmp_path):
    items = [example(tokenizer, f"p{i}", 0.5, seed=i) for i in range(4)]
    cfg = {"steps": 1, "batch_size": 2, "warmup_steps": 1}
    model = tiny_model(tokenizer)
    T.train_loop(model, model.parameter_groups(), items, _loss_fn, cfg, tmp_path, payload_fn=L.checkpoint_payload, progress=False)
    other = tiny_model(tokenizer, lora_r=4)

    def check(payload, path):
        L.check_checkpoint_config(payload["config"], other.config, path)

    with pytest.raises(T.CheckpointError, match="lora_r = 8.*lora_r = 4"):
        T.train_loop(other, other.parameter_groups(), items, _loss_fn, {**cfg, "steps": 2}, tmp_path,
                     payload_fn=L.checkpoint_payload, check_resume=check, progress=False)


def test_stage1_checkpoint_round_trip(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    model.set_target_stats([example(tokenizer, "s", seed=5), example(tokenizer, "t", seed=6)])
    assert float(model.target_std.min()) > 0.1 and float(model.target_mean.abs().max()) > 0
    with torch.no_grad():
        for p in model.parameter_groups()["lora"]:
            p.add_(0.01)
    path = T.save_checkpoint(tmp_path / "latest.pt", L.checkpoint_payload(model))
    loaded = L.load_stage1(path, llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    e = [example(tokenizer, "a")]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(e)["emotion"], loaded(e)["emotion"])
    torch.testing.assert_close(model.target_std, loaded.target_std)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(T.CheckpointError, match="04_stage1"):
        L.load_stage1(tmp_path / "bad.pt", llm=tiny_llm(tokenizer), tokenizer=tokenizer)


def test_merged_lora_gives_the_same_outputs_and_training_unmerges_it(tokenizer):
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        for p in model.parameter_groups()["lora"]:
            p.normal_(std=0.3)  # B starts at zero: make the update large enough to matter
    e = [example(tokenizer, "a")]
    with torch.no_grad():
        before = model(e)
        replies = model.generate(e, max_new_tokens=6)  # unmerged
        merged_model = model.merge_lora()
        assert merged_model is model and model.lora_merged and not model.training
        weight = model.llm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        after = model(e)
    torch.testing.assert_close(after["emotion"], before["emotion"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after["ce"], before["ce"], atol=1e-4, rtol=1e-4)
    model.train()  # training must see the factors, not weights with an update folded in
    assert not model.lora_merged
    restored = model.llm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(restored, weight)
    with torch.no_grad():
        merged_replies = model.eval().merge_lora().generate(e, max_new_tokens=6)
    assert replies[0]["token_ids"] == merged_replies[0]["token_ids"]
    # the text cascade switches LoRA off: inside, the base backbone; after, the LoRA model again
    with torch.no_grad():
        with model.llm.disable_adapter():
            base = model(e)
        assert not torch.allclose(base["ce"], before["ce"], atol=1e-3)
        torch.testing.assert_close(model(e)["ce"], before["ce"], atol=1e-4, rtol=1e-4)
        assert model.merge_lora().lora_merged
    # a checkpoint loaded into a merged model replaces the factors in the weights too
    state = model.trainable_state()
    other = tiny_model(tokenizer).eval().merge_lora()
    other.load_trainable_state(state)
    assert other.lora_merged
    with torch.no_grad():
        torch.testing.assert_close(other(e)["emotion"], before["emotion"], atol=1e-4, rtol=1e-4)


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    lengths = list(np.random.default_rng(0).integers(10, 100, 50))
    a = T.batch_order(lengths, 4, seed=1, epoch=0)
    assert a == T.batch_order(lengths, 4, seed=1, epoch=0) != T.batch_order(lengths, 4, seed=1, epoch=1)
    assert all(len(b) == 4 for b in a) and len({i for b in a for i in b}) == 48


def test_text_baseline_prompts(tokenizer):
    plain = L.plain_messages("They called me back.")
    assert [m["role"] for m in plain] == ["system", "user"] and plain[1]["content"] == "They called me back."
    from emo_lib.corpus import chat_messages

    untagged = chat_messages("They called me back.", None)
    assert all("(" not in m["content"] for m in untagged if m["role"] == "user")
    assert chat_messages("They called me back.", "anger")[-1]["content"] == "(angry) They called me back."
    with pytest.raises(ValueError, match="plain prompt"):
        L.text_replies(None, tokenizer, ["hi"], ["anger"], prompt="plain")


# -- the auxiliary transcription task and the listening test ---------------------------------
def with_script(e, tokenizer, text="my cat is sick"):
    import dataclasses

    return dataclasses.replace(e, transcript_ids=list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def test_transcription_task_replaces_the_reply_with_the_query_words_and_its_own_prompt(tokenizer):
    model = tiny_model(tokenizer, transcribe_prob=0.999).train()
    items = [with_script(example(tokenizer, f"p{i}", 0.6, seed=i), tokenizer) for i in range(4)]
    torch.manual_seed(0)
    drawn = model.transcription_draws(items)
    assert all(d.task == "transcribe" and d.response_ids == e.transcript_ids and d.trajectory is None
               for d, e in zip(drawn, items))
    batch = model.splice(drawn)
    n = len(model.transcribe_prefix_ids)
    assert not torch.equal(model.transcribe_prefix_ids, model.prefix_ids)  # another instruction
    np.testing.assert_allclose(batch.inputs_embeds[0, :n].detach(), model.embed_tokens(model.transcribe_prefix_ids).detach())
    labelled = (batch.labels[0] != -100).nonzero().flatten().tolist()
    assert batch.labels[0, labelled].tolist() == items[0].transcript_ids + [model.end_id]
    assert not batch.target_mask.any()  # no emotion target: the emotion loss skips these examples
    out = model(items)
    assert float(out["mse"].detach()) == 0.0 and float(out["one_minus_cos"].detach()) == 0.0 and float(out["ce"].detach()) > 0


def test_transcription_task_never_applies_in_eval_mode_without_a_script_or_at_zero(tokenizer):
    items = [with_script(example(tokenizer, f"p{i}", 0.6, seed=i), tokenizer) for i in range(3)]
    model = tiny_model(tokenizer, transcribe_prob=0.999).eval()
    a, b = model(items), model(items)
    assert float(a["ce"]) == float(b["ce"]) and bool(a["target_mask"].any())  # replies, deterministic
    bare = [example(tokenizer, "q", 0.6)]  # no transcript ids: stays a reply
    assert model.transcription_draws(bare)[0].task == "reply"
    off = tiny_model(tokenizer).train()
    assert off.transcription_draws(items) is items
    with pytest.raises(ValueError, match="transcribe_prob"):
        tiny_model(tokenizer, transcribe_prob=1.0)


def test_transcription_draws_follow_the_probability(tokenizer):
    model = tiny_model(tokenizer, transcribe_prob=0.3).train()
    items = [with_script(example(tokenizer, f"p{i}", 0.2, seed=i), tokenizer) for i in range(400)]
    torch.manual_seed(1)
    share = np.mean([d.task == "transcribe" for d in model.transcription_draws(items)])
    assert 0.24 < share < 0.36


def test_listening_test_swaps_speech_of_the_same_emotion_and_keeps_the_reply(tokenizer):
    texts = ["a", "b", "c", "d"]
    items = [example(tokenizer, f"p{i}", 0.4 + 0.1 * i, seed=i) for i in range(4)]
    rows = {f"p{i}": {"query_emotion": "sad" if i < 2 else "happy", "query_text": texts[i]} for i in range(4)}
    swapped = L.swapped_queries(items, rows, seed=0)
    assert [s.pair_id for s in swapped] == ["p0", "p1", "p2", "p3"]
    assert swapped[0].semantic is items[1].semantic and swapped[2].semantic is items[3].semantic
    assert swapped[0].response_ids == items[0].response_ids and swapped[0].trajectory is items[0].trajectory
    rows["p3"]["query_text"] = "c"  # p2 and p3 now say the same words: no partner for either
    assert [s.pair_id for s in L.swapped_queries(items, rows)] == ["p0", "p1"]
    model = tiny_model(tokenizer).eval()
    result = L.listening_test(model, items, rows)
    assert result["n"] == 2
    assert result["gain"] == pytest.approx(result["ce_swapped"] - result["ce_true"])
    assert result["ce_true"] == pytest.approx(L.evaluate_teacher_forced(model, items[:2])["ce"])


def test_transcripts_use_the_transcription_prompt(tokenizer):
    model = tiny_model(tokenizer).eval()
    e = example(tokenizer, "p", 0.5)
    import dataclasses

    asked = model.generate([dataclasses.replace(e, task="transcribe")], max_new_tokens=5, repetition_penalty=1.0)[0]["text"]
    assert L.transcripts(model, [e], max_new_tokens=5) == [asked.strip()]
