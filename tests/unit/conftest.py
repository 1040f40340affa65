import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged SmolLM2 tokenizer (offline), shared by the stage-1 and pipeline tests."""
    from transformers import AutoTokenizer

    from emo_lib.pretrained import llm_folder

    return AutoTokenizer.from_pretrained(llm_folder("packaged:smollm2-135m-instruct"))


@pytest.fixture
def autocast_calls(monkeypatch):
    """Record every ``torch.autocast(device_type, dtype, enabled)`` call (the real autocast still runs)."""
    import torch

    seen = []
    real_autocast = torch.autocast

    def spy(device_type, dtype=None, enabled=True):
        seen.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled)

    monkeypatch.setattr(torch, "autocast", spy)
    return seen
