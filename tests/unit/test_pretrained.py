import numpy as np
import pytest
import torch

from emo_lib import audio, pretrained, tts


def test_vocoder_resynthesizes_real_speech():
    voc = pretrained.load_vocoder()
    rng = np.random.default_rng(0)
    wav = tts.synthesize("The results came in this morning.", "f2", tts.sample_prosody("neutral", rng))
    mel = audio.hifigan_log_mel(wav)
    with torch.inference_mode():
        out = voc(mel[None])[0].numpy()
    assert out.shape[0] == mel.shape[1] * 256
    again = audio.hifigan_log_mel(out)
    n = min(again.shape[1], mel.shape[1])
    error = (again[:, :n] - mel[:, :n]).abs().mean().item()
    silence = (torch.full_like(mel, -11.5) - mel).abs().mean().item()
    assert error < 0.5 < silence  # close to the input, far from silence


def test_vocoder_errors_are_clear(tmp_path):
    with pytest.raises(pretrained.ModelSourceError, match="does not exist"):
        pretrained.load_vocoder(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "config.json").write_text((pretrained.packaged_path("hifigan-universal").parent / "config.json").read_text())
    with pytest.raises(pretrained.ModelSourceError, match="cannot read"):
        pretrained.load_vocoder(str(bad))


def test_packaged_llm_answers():
    model, tokenizer = pretrained.load_llm()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    chat = [{"role": "user", "content": "Say hello."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_hub_id_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pretrained.ModelSourceError, match="packaged:smollm2-135m-instruct"):
        pretrained.load_llm("someone/not-a-real-model-xyz")


def test_paper_models_on_meta_cost_nothing():
    llm = pretrained.paper_llm_on_meta()
    total, _ = pretrained.count_parameters(llm)
    assert 7.0e9 < total < 8.0e9
    assert next(llm.parameters()).device.type == "meta"
