import pytest

from emo_lib.presets import PRESET_NAMES, PresetError, flatten, load_preset, parse_override


def test_every_preset_loads_with_the_same_keys():
    keys = None
    for name in PRESET_NAMES:
        cfg = load_preset(name)
        assert cfg.name == name
        flat = set(flatten(cfg))
        keys = keys or flat
        assert flat == keys


def test_presets_change_sizes_not_structure():
    smoke, cpu = load_preset("smoke"), load_preset("cpu")
    assert smoke["data"]["queries_per_cell"] < cpu["data"]["queries_per_cell"]
    assert load_preset("paper")["models"]["llm"] == "Qwen/Qwen2.5-7B-Instruct"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(PresetError, match="smoke, cpu, gpu, paper"):
        load_preset("tiny")


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(PresetError) as err:
        load_preset("cpu", {"data.wer_treshold": 0.2})
    assert "data.wer_treshold" in str(err.value)
    assert "data.wer_threshold" in str(err.value)


def test_wrong_type_is_refused():
    with pytest.raises(PresetError, match="data.queries_per_cell"):
        load_preset("cpu", {"data.queries_per_cell": "many"})


def test_override_applies():
    cfg = load_preset("cpu", {"data.wer_threshold": 0.2, "seed": 3})
    assert cfg["data"]["wer_threshold"] == 0.2 and cfg["seed"] == 3


def test_preset_file_with_unknown_key(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("extends: smoke\ndata:\n  wer_threshold: 0.5\n")
    cfg = load_preset(str(good))
    assert cfg.name == "mine" and cfg["data"]["wer_threshold"] == 0.5
    assert cfg["data"]["queries_per_cell"] == load_preset("smoke")["data"]["queries_per_cell"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: smoke\ndata:\n  colour: blue\n")
    with pytest.raises(PresetError, match="data.colour"):
        load_preset(str(bad))


def test_parse_override():
    assert parse_override("data.jitter=0.5") == ("data.jitter", 0.5)
    assert parse_override("data.domains=[work, pets]") == ("data.domains", ["work", "pets"])
    with pytest.raises(PresetError):
        parse_override("data.jitter")
