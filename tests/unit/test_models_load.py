import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from instructkit.config import AdapterConfig, ModelConfig
from instructkit.errors import UserError
from instructkit.models import (
    apply_adapter,
    build_tiny_model,
    count_parameters,
    decoder_layers,
    detect_target_modules,
    freeze_layers,
    load_model,
    load_tokenizer,
)
from instructkit.models.adapters import LLAMA_STYLE, OPT_STYLE, QLORA_UNAVAILABLE


def tiny_opt():
    cfg = OPTConfig(
        vocab_size=128, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16,
    )
    torch.manual_seed(0)
    return OPTForCausalLM(cfg)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_model_defaults(tiny_model_cfg, tiny_tokenizer):
    model = load_model(tiny_model_cfg, AdapterConfig(), tiny_tokenizer, "cpu")
    assert model.config.use_cache is False and model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    again = load_model(tiny_model_cfg, AdapterConfig(), tiny_tokenizer, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_precision(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.precision = "bf16"
    assert load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu").dtype == torch.bfloat16
    tiny_model_cfg.precision = "bf16-mixed"  # fp32 weights; the engine autocasts
    assert load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu").dtype == torch.float32


def test_attention_implementation_and_sdp_switches(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.attn_implementation = "eager"
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    assert model.config._attn_implementation == "eager"
    was = torch.backends.cuda.flash_sdp_enabled()
    try:
        tiny_model_cfg.disable_flash_sdp = True
        load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
        assert not torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(was)


def test_lora_targets_llama_and_opt():
    assert detect_target_modules(build_tiny_model()) == LLAMA_STYLE
    opt = tiny_opt()
    assert detect_target_modules(opt) == OPT_STYLE
    assert decoder_layers(opt) == list(opt.model.decoder.layers)
    peft_opt = apply_adapter(opt, AdapterConfig(kind="lora", r=4))
    names = trainable_names(peft_opt)
    assert names and all("lora_" in n for n in names)
    assert any(".fc1.lora_A" in n for n in names) and any(".out_proj.lora_B" in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_lora_fallback_targets_every_linear_of_unknown_architectures():
    model = build_tiny_model()
    model.config.model_type = "something-new"
    assert set(detect_target_modules(model)) == set(LLAMA_STYLE)


def test_lora_only_adapters_train(tiny_model_cfg, tiny_tokenizer):
    cfg = AdapterConfig(kind="lora", r=4, alpha=8)
    model = load_model(tiny_model_cfg, cfg, tiny_tokenizer, "cpu")
    names = trainable_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # 7 target modules x 2 layers x (A and B)
    assert len(names) == 7 * 2 * 2
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert model.training and model.get_base_model().config.use_cache is False
    # gradients reach the adapters only
    x = torch.randint(0, 1000, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names)


def test_explicit_target_modules(tiny_model_cfg, tiny_tokenizer):
    cfg = AdapterConfig(kind="lora", r=2, target_modules=["q_proj", "v_proj"])
    model = load_model(tiny_model_cfg, cfg, tiny_tokenizer, "cpu")
    names = trainable_names(model)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="qkv"):
        bad = AdapterConfig(kind="lora", target_modules=["qkv"])
        load_model(tiny_model_cfg, bad, tiny_tokenizer, "cpu")


def test_dora_builds(tiny_model_cfg, tiny_tokenizer):
    model = load_model(tiny_model_cfg, AdapterConfig(kind="dora", r=4), tiny_tokenizer, "cpu")
    names = trainable_names(model)
    assert any("lora_magnitude_vector" in n for n in names)
    x = torch.randint(0, 1000, (1, 6))
    model(input_ids=x, labels=x).loss.backward()


def test_one_layer_finder_for_one_model_a_container_and_a_plain_module():
    """freeze_layers, compile_layers, LoRA targets and FSDP2 sharding find blocks the same way:
    PPO's ModuleDict of policy and value model gives both models' blocks, in order."""
    policy, value = build_tiny_model(), build_tiny_model()
    both = torch.nn.ModuleDict({"policy": policy, "value": value})
    assert decoder_layers(both) == list(policy.model.layers) + list(value.model.layers)

    class Plain(torch.nn.Module):  # no transformers block class: found by its attribute path
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    plain = Plain()
    assert decoder_layers(plain) == list(plain.layers)
    with pytest.raises(UserError, match="cannot find the decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_freeze_layers_full_model(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.freeze_layers = 1
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {"model.embed_tokens.weight"} | {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")
    }
    assert frozen == expected
    tiny_model_cfg.freeze_layers = 3
    with pytest.raises(UserError, match="only 2 layers"):
        load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")


def test_freeze_layers_with_lora_and_opt(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.freeze_layers = 1
    model = load_model(tiny_model_cfg, AdapterConfig(kind="lora", r=2), tiny_tokenizer, "cpu")
    names = trainable_names(model)
    assert names and all(".layers.1." in n for n in names)
    opt = tiny_opt()
    freeze_layers(opt, 1)
    frozen = {n for n, p in opt.named_parameters() if not p.requires_grad}
    assert "model.decoder.embed_tokens.weight" in frozen
    assert "model.decoder.embed_positions.weight" in frozen
    assert all(n.startswith("model.decoder.embed") or ".layers.0." in n for n in frozen)


def test_gradient_checkpointing_and_compile(tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.gradient_checkpointing = True
    model = load_model(tiny_model_cfg, AdapterConfig(kind="lora", r=2), tiny_tokenizer, "cpu")
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    x = torch.randint(0, 1000, (1, 6))
    model(input_ids=x, labels=x).loss.backward()
    tiny_model_cfg.gradient_checkpointing = False
    tiny_model_cfg.compile = True
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    # compiled lazily, in place: the state dict keeps its names
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_qlora_without_cuda_is_a_user_error(tiny_model_cfg, tiny_tokenizer):
    with pytest.raises(UserError) as e:
        load_model(tiny_model_cfg, AdapterConfig(kind="qlora"), tiny_tokenizer, "cpu")
    assert str(e.value) == QLORA_UNAVAILABLE
    assert "bitsandbytes" in QLORA_UNAVAILABLE and "adapter.kind=lora" in QLORA_UNAVAILABLE


def test_nonexistent_model_path_is_a_user_error(tmp_path):
    path = str(tmp_path / "missing-model")
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(name_or_path=path), None, None, "cpu")
    assert path in str(e.value) and "hub id" in str(e.value)
    with pytest.raises(UserError, match="not a .gguf"):
        f = tmp_path / "weights.bin"
        f.write_bytes(b"x")
        load_model(ModelConfig(name_or_path=str(f)), None, None, "cpu")


def test_load_from_local_hf_folder(tmp_path, tiny_tokenizer):
    ref = build_tiny_model("tiny-llama", seed=3)
    ref.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), device="cpu")
    tok = load_tokenizer(cfg)
    assert len(tok) == len(tiny_tokenizer) and tok.chat_template
    model = load_model(cfg, AdapterConfig(kind="lora", r=2), tok, "cpu")
    model.eval()
    ref.eval()
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert model.get_base_model().name_or_path == str(tmp_path)


def test_local_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="cannot load"):
        load_model(ModelConfig(name_or_path=str(tmp_path)), None, None, "cpu")


def test_auto_model_class_is_llama(tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"


def test_generate_during_training_uses_the_kv_cache(tmp_path, tiny_tokenizer):
    """use_cache=False for training must not make generate() recompute the whole prefix."""
    build_tiny_model().save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), device="cpu")
    model = load_model(cfg, AdapterConfig(kind="lora", r=2), tiny_tokenizer, "cpu")
    assert model.get_base_model().config.use_cache is False
    seen = []
    inner = model.get_base_model().model
    handle = inner.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        model.eval()
        x = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            model.generate(input_ids=x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert seen[0] == 5 and seen[1:] == [1, 1, 1]


@pytest.mark.parametrize("adapter, damage", [("none", "truncate"), ("none", "empty"), ("lora", "truncate"),
                                             ("lora", "garbage")])
def test_damaged_weights_are_one_line(tmp_path, adapter, damage):
    """A truncated, empty or overwritten weights file was safetensors' traceback, for training
    from it (model.name_or_path), generate, eval and merge alike."""
    from instructkit.export import merge_adapter
    from instructkit.models import load_for_inference, save_final, tiny_tokenizer

    cfg = ModelConfig(name_or_path="tiny-llama", device="cpu")
    tok = tiny_tokenizer()
    model = load_model(cfg, AdapterConfig(kind=adapter, r=4, alpha=8), tok, "cpu")
    folder = save_final(model, tok, tmp_path / "final", cfg)
    weights = folder / ("adapter_model.safetensors" if adapter == "lora" else "model.safetensors")
    blob = weights.read_bytes()
    weights.write_bytes({"truncate": blob[: len(blob) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(UserError, match=r"final.*: the weights cannot be read .*damaged or incomplete"):
        load_for_inference(folder)
    if adapter == "none":
        with pytest.raises(UserError, match=r"model.name_or_path=.*the weights cannot be read"):
            load_model(ModelConfig(name_or_path=str(folder), device="cpu"), AdapterConfig(kind="none"), tok, "cpu")
    else:
        with pytest.raises(UserError, match=r"the weights cannot be read"):
            merge_adapter(folder, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
