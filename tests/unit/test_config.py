import re

import pytest

from instructkit.config import SFTConfig, load_config
from instructkit.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "data:\n  train: x.jsonl\ntrain:\n  max_steps: 10\n"


def test_loads_and_overrides(tmp_path):
    p = write(tmp_path, BASE + "model:\n  name_or_path: tiny-llama\n")
    cfg = load_config(SFTConfig, p, ["train.lr=1e-3", "adapter.kind=lora", "output_dir=runs/x"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.kind == "lora"
    assert cfg.output_dir == "runs/x"
    assert cfg.train.max_steps == 10


def test_unknown_key_names_file_line_and_valid_keys(tmp_path):
    p = write(tmp_path, BASE + "model:\n  name_or_path: a\n  atn_implementation: eager\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert "c.yaml, line 7" in msg and "model.atn_implementation" in msg
    assert "attn_implementation" in msg and "precision" in msg  # lists valid keys, suggests


def test_unknown_override_names_the_override():
    with pytest.raises(ConfigError, match="command line override train.max_stepz"):
        load_config(SFTConfig, None, ["data.train=x", "train.max_stepz=3"])


def test_a_misspelt_section_in_an_override_is_blamed_on_the_override(tmp_path):
    """`trian.lr=1` was reported as "c.yaml, key trian": the file has no such key."""
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"^command line override trian: unknown key 'trian'. Did you mean 'train'"):
        load_config(SFTConfig, p, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"^command line override model.nested: unknown key 'nested'"):
        load_config(SFTConfig, p, ["model.nested.deeper=1"])


def test_wrong_type_and_bad_choice(tmp_path):
    p = write(tmp_path, BASE + "  micro_batch_size: four\n")
    with pytest.raises(ConfigError, match=r"line 5.*expected an integer, got 'four'"):
        load_config(SFTConfig, p)
    with pytest.raises(ConfigError, match="'qlora4'.*'none', 'lora', 'dora', 'qlora'"):
        load_config(SFTConfig, write(tmp_path, BASE), ["adapter.kind=qlora4"])


def test_exactly_one_of_epochs_and_max_steps(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of train.max_steps and train.epochs"):
        load_config(SFTConfig, write(tmp_path, BASE), ["train.epochs=1"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(SFTConfig, None, ["data.train=x"])


def test_global_batch_derives_accumulation(tmp_path):
    """A derived value, not a rewritten field: the config stays what the user wrote."""
    from instructkit.config import accumulation, effective_batch_size

    cfg = load_config(SFTConfig, write(tmp_path, BASE), ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert cfg.train.grad_accum == 1 and accumulation(cfg.train, 1) == 4 and effective_batch_size(cfg.train, 1) == 8
    cfg = load_config(SFTConfig, write(tmp_path, BASE), ["train.micro_batch_size=2", "train.global_batch_size=8"], world_size=2)
    assert accumulation(cfg.train, 2) == 2 and effective_batch_size(cfg.train, 2) == 8
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config(SFTConfig, write(tmp_path, BASE), ["train.micro_batch_size=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="needs grad_accum=4"):
        load_config(SFTConfig, write(tmp_path, BASE), ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_accum=3"])


def test_preset_fills_defaults_and_file_wins(tmp_path):
    p = write(tmp_path, BASE + "preset: llama-2-13b\nadapter:\n  kind: lora\n  dropout: 0.1\n")
    cfg = load_config(SFTConfig, p)
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.dropout) == (32, 64, 0.1)
    assert cfg.train.micro_batch_size == 2 and cfg.train.grad_accum == 8
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(SFTConfig, p, ["preset=llama-9"])


@pytest.mark.parametrize("name,r,alpha", [("llama-2-7b", 16, 32), ("llama-2-13b", 32, 64), ("llama-2-70b", 64, 128)])
def test_llama2_presets(name, r, alpha):
    from instructkit.presets import preset_values

    v = preset_values(name)
    assert (v["adapter"]["r"], v["adapter"]["alpha"], v["adapter"]["dropout"]) == (r, alpha, 0.05)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(SFTConfig, "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    from instructkit.config import save_config

    cfg = load_config(SFTConfig, write(tmp_path, BASE), ["adapter.kind=lora", "adapter.target_modules=[q_proj,v_proj]"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_a_section_keeps_its_stages_own_defaults(tmp_path):
    """PPO's train.lr default is 1e-5 and pretraining's weight decay 0.1: a YAML train: section
    that does not set them must not fall back to the generic TrainConfig values."""
    from instructkit.config import PPOConfig, PretrainConfig, RMConfig

    p = write(tmp_path, "data:\n  train: x.jsonl\nreward:\n  function: m:f\ntrain:\n  max_steps: 3\n")
    cfg = load_config(PPOConfig, p)
    assert cfg.train.lr == 1e-5 and cfg.train.max_steps == 3
    p = write(tmp_path, "data:\n  train: [x.txt]\ntrain:\n  max_steps: 3\n")
    cfg = load_config(PretrainConfig, p)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.betas) == (1e-3, 0.1, [0.9, 0.95])
    p = write(tmp_path, "data:\n  train: x.jsonl\ntrain:\n  max_steps: 3\n")
    assert not hasattr(load_config(RMConfig, p).data, "packing")  # preference rows are never packed


@pytest.mark.parametrize("override,message", [
    ("train.lr=.nan", "train.lr=nan must be a finite number above 0"),
    ("train.lr=1e39", "train.lr=1e+39 must be a finite number above 0"),
    ("train.lr=-1", "train.lr=-1.0 must be a finite number above 0"),
    ("train.min_lr=-2", "train.min_lr=-2.0 must be a finite number >= 0"),
    ("train.save_every=-1", "train.save_every and train.eval_every must be >= 0"),
    ("train.save_every=1 train.keep_last=0", "train.keep_last must be >= 1"),
])
def test_bad_numbers_are_one_clear_error(override, message):
    """These were tracebacks deep in the optimizer (nan, 1e39, -1) or silent (save_every=-1 saved every step)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(SFTConfig, None, ["data.train=x.jsonl", "train.max_steps=1", *override.split()])


@pytest.mark.parametrize("key", ["rollout.prompts_per_step", "rollout.micro_batch_size", "rollout.max_new_tokens",
                                 "ppo.mini_batch_size", "ppo.epochs"])
def test_ppo_sizes_must_be_positive(key):
    from instructkit.config import PPOConfig

    with pytest.raises(ConfigError, match=re.escape(f"{key}=0 must be > 0")):
        load_config(PPOConfig, None, ["data.train=x.jsonl", "reward.function=m:f", "train.max_steps=1", f"{key}=0"])


def test_config_is_a_leaf_and_check_changes_nothing(tmp_path):
    """config imports nothing above it (it imported models and the distributed engine: the one
    import cycle), and check() validates without rewriting what it checks."""
    import copy
    import subprocess
    import sys

    from instructkit.config import PPOConfig

    code = "import sys, instructkit.config; print(sorted(m for m in sys.modules if m.startswith('instructkit')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["instructkit", "instructkit.atomic", "instructkit.config", "instructkit.errors",
                            "instructkit.redact", "instructkit.shapes"]
    for cfg in (load_config(SFTConfig, write(tmp_path, BASE), ["train.micro_batch_size=2", "train.global_batch_size=8"]),
                load_config(PPOConfig, None, ["reward.function=instructkit.rewards:says_the", "data.train=x",
                                              "train.max_steps=2"])):
        before = copy.deepcopy(cfg)
        cfg.check(1)
        assert cfg == before
    assert cfg.reward.normalize == "stored" and cfg.reward.normalization() == "none"  # a function: no statistics
