import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged SmolLM2 tokenizer (offline), shared by the stage-1 and pipeline tests."""
    from transformers import AutoTokenizer

    from emo_lib.pretrained import llm_folder

    return AutoTokenizer.from_pretrained(llm_folder("packaged:smollm2-135m-instruct"))
