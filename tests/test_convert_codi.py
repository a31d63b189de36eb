"""``engine convert codi``: a CODI-layout checkpoint, served, answers as CODI's own loop does.

The test writes what CODI's trainer saves for a tiny base (GPT-2, whose adapted layers are
``Conv1D``, and Llama, ``nn.Linear``): the peft-wrapped base under ``codi.`` with random,
non-zero LoRA A and B on the targets CODI adapts, the embedding resized by its three
tokens, the tied LM head left out, and a random projection under ``prj.``. The oracle is an
independent re-implementation of CODI's ``test.py`` inference at batch 1 (greedy): the
unmerged adapters applied at forward time by hooks (``x W + scale * (x A^T) B^T``), the
question + EOS + bot prefilled with a Hugging Face cache, each thought ``prj(h)``, then
``eot EOS``, and decoding over all logits but the last entry. The converted checkpoint
must give the same tokens through the engine and through the server.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from torch.nn import functional as F

from engine import Engine, LatentPolicy, SamplingParams
from engine.feedback import LatentProjection
from engine.train.convert_codi import convert_codi
from tests.test_server_harness import InProcessServer

TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
           "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")}
QUESTIONS = ["Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?",
             "Max is a tumpus. Every tumpus is a numpus. Is Max a numpus or lempus?", "Is Sally a rompus?"]
RANK, ALPHA, NUM_LATENT = 4, 8.0, 3


def _base(directory: Path, arch: str):
    from transformers import AutoModelForCausalLM

    from engine.tiny import model_config, sample_corpus, train_tokenizer

    tokenizer = train_tokenizer(sample_corpus(), vocab_size=300, bos=arch == "llama")
    config = model_config(arch, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=arch == "gpt2")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def _codi_state(model, tokenizer, arch: str, layer_norm: bool):
    """What CODI saves: the peft model's state dict under codi., the projection under prj."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(3)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = torch.randn(3, model.config.hidden_size, generator=g) * 0.2
        # make <eot> (the last entry, which CODI's decoding never picks) the argmax of many
        # states: its output row along their mean direction
        ids = torch.tensor([tokenizer(QUESTIONS[0])["input_ids"]])
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(dim=(0, 1))
        head = model.get_output_embeddings().weight
        head[vocab + 2] = states / states.norm() * head[:vocab].norm(dim=-1).max() * 3
    state, adapters = {}, {}
    targets = TARGETS[arch]
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets:
            fan_in, fan_out = (module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1])
            adapters[name] = (torch.randn(RANK, fan_in, generator=g) * 0.3, torch.randn(fan_out, RANK, generator=g) * 0.3)
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("lm_head.weight") and model.config.tie_word_embeddings:
            continue                                       # shared with the embedding: not saved
        if module in adapters:
            key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
        state[f"codi.base_model.model.{key}"] = value.clone()
    for module, (a, b) in adapters.items():
        state[f"codi.base_model.model.{module}.lora_A.default.weight"] = a
        state[f"codi.base_model.model.{module}.lora_B.default.weight"] = b
    d = model.config.hidden_size
    prj = LatentProjection(d, 2 * d, layer_norm=layer_norm)
    with torch.no_grad():
        for name, p in prj.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "ln.weight" else 0.0))
    state.update({f"prj.{k}": v for k, v in prj.state_dict().items()})
    return state, adapters, prj


def _codi_loop(base_dir: Path, state, adapters, prj, tokenizer, question: str, eos: bool, max_new: int):
    """CODI's test.py at batch 1, greedy, with the adapters unmerged (forward hooks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)
    own = {k.replace(".base_layer.", "."): v for k, v in
           ((k[len("codi.base_model.model."):], v) for k, v in state.items() if k.startswith("codi.")
            and "lora_" not in k)}
    model.load_state_dict(own, strict=False)
    model.tie_weights()
    modules = dict(model.named_modules())
    for name, (a, b) in adapters.items():
        modules[name].register_forward_hook(
            lambda mod, inputs, out, a=a, b=b: out + (ALPHA / RANK) * F.linear(F.linear(inputs[0], a), b))
    model.eval()
    bot_id, eot_id = vocab + 1, vocab + 2
    eos_id = tokenizer.eos_token_id
    with torch.no_grad():
        ids = tokenizer(question)["input_ids"] + ([eos_id, bot_id] if eos else [bot_id])
        out = model(input_ids=torch.tensor([ids]), use_cache=True, output_hidden_states=True)
        past = out.past_key_values
        latent = prj(out.hidden_states[-1][:, -1, :].unsqueeze(1))
        for _ in range(NUM_LATENT):
            out = model(inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=past)
            past = out.past_key_values
            latent = prj(out.hidden_states[-1][:, -1, :].unsqueeze(1))
        embed = model.get_input_embeddings()
        output = embed(torch.tensor([[eot_id, eos_id]] if eos else [[eot_id]]))
        tokens = []
        for _ in range(max_new):
            out = model(inputs_embeds=output, use_cache=True, past_key_values=past)
            past = out.past_key_values
            token = int(out.logits[:, -1, :model.config.vocab_size - 1].argmax(-1))
            if int(out.logits[:, -1].argmax(-1)) == eot_id:
                SUPPRESSED.append(question)
            tokens.append(token)
            if token == eos_id:
                break
            output = embed(torch.tensor([[token]]))
    return tokens


SUPPRESSED: list[str] = []   # questions where the last entry would have won without CODI's cut


@pytest.mark.parametrize("arch,eos,layer_norm,file", [("gpt2", True, True, "model.safetensors"),
                                                      ("llama", False, False, "pytorch_model.bin")])
def test_converted_codi_answers_like_codi(tmp_path, arch, eos, layer_norm, file):
    base_dir = tmp_path / "base"
    model, tokenizer = _base(base_dir, arch)
    SUPPRESSED.clear()
    state, adapters, prj = _codi_state(model, tokenizer, arch, layer_norm)
    ckpt = tmp_path / "codi"
    ckpt.mkdir()
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / file))
    else:
        torch.save(state, ckpt / file)
    out = convert_codi(ckpt, base_dir, tmp_path / "served", num_latent=NUM_LATENT, lora_alpha=ALPHA, eos=eos)
    engine = Engine.from_pretrained(out)
    assert engine.checkpoint.projection is not None and engine.coconut.num_thoughts == NUM_LATENT
    results = engine.generate(QUESTIONS, SamplingParams(max_tokens=8))
    eos_id = tokenizer.eos_token_id
    for question, result in zip(QUESTIONS, results):
        expected = _codi_loop(base_dir, state, adapters, prj, tokenizer, question, eos, 8)
        ours = result.token_ids + ([eos_id] if result.finish_reason == "stop" else [])
        assert ours == expected, question
        assert result.num_thoughts == NUM_LATENT
    assert SUPPRESSED, "the suppressed last entry never mattered: the test would not see it ignored"
    # the LoRA deltas matter: without them the answers differ
    plain = _codi_loop(base_dir, state, {}, prj, tokenizer, QUESTIONS[0], eos, 8)
    assert plain != _codi_loop(base_dir, state, adapters, prj, tokenizer, QUESTIONS[0], eos, 8)
    if arch == "gpt2":   # and over HTTP
        with InProcessServer(out, engine=engine) as server:
            r = httpx.post(server.url + "/v1/reason", json={"question": QUESTIONS[0], "max_tokens": 8}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["text"] == results[0].text
            assert r.json()["usage"]["latent_thoughts"] == NUM_LATENT


def test_a_non_codi_state_dict_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a CODI checkpoint"):
        convert_codi(tmp_path, tmp_path, tmp_path / "out", num_latent=2, lora_alpha=1.0)
