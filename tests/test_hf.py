"""The Hugging Face integration (``flashattn_modules.hf``, GitHub issue 5).

CPU tests run our Triton kernels through the interpreter (FLASHATTN_CPU_BACKEND=triton) on
tiny random fp32 models, initialised with a large ``initializer_range`` so that attention is
sharp (a wrong mask, window, scale or softcap moves the logits far beyond the tolerance), and
compare with the same weights under transformers' eager attention: max abs logit error
<= 1e-4 at every real (non-padding) position. A spy on the dispatcher checks that our kernel
really ran. GPU tests (``-m gpu``) compare fp16/bf16 against SDPA/eager and fp32 generation
with dynamic and (auto-compiled) static caches.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    CLIPVisionConfig,
    DynamicCache,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    StaticCache,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import flashattn_modules  # noqa: E402
from flashattn_modules import hf, patch_hf_model, unpatch_hf_model  # noqa: E402

TOL = 1e-4
VOCAB = 97
INIT = 0.2  # weights' std: scores of std ~1, so attention patterns are sharp
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "triton")


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Records every call the integration makes to the dispatcher (CPU path)."""
    record: list[dict] = []
    real = hf._dispatch.attention

    def spy(q, k, v, **kwargs):
        record.append({"q": tuple(q.shape), "k": tuple(k.shape), **kwargs})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(hf._dispatch, "attention", spy)
    return record


# ----------------------------------------------------------------------------- helpers

def _llama(**overrides) -> LlamaConfig:
    options = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                   initializer_range=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    options.update(overrides)
    return LlamaConfig(**options)


def _causal_lm(config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _batch(lengths: list[int], seq_len: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, seq_len) and a 0/1 attention mask with ``lengths`` real tokens per row,
    padding on ``side``; padding positions hold random ids too (they must not matter)."""
    ids = torch.randint(3, VOCAB, (len(lengths), seq_len))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seq_len - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> None:
    """Max abs error over real token positions (padding rows: eager averages over nothing
    useful, we return 0; neither is meaningful)."""
    assert ref[valid].abs().max() > 0.5  # not testing on (near-)zeros
    err = (ours - ref)[valid].abs().max().item()
    assert err <= TOL, f"max abs logit error {err:.3g} > {TOL}"


def _compare_forward(model, calls, ids, mask, output: str = "logits") -> None:
    with torch.no_grad():
        ref = getattr(model(input_ids=ids, attention_mask=mask), output)
        with patch_hf_model(model):
            ours = getattr(model(input_ids=ids, attention_mask=mask), output)
    assert calls, "our kernel was never called"
    _assert_close(ours, ref, mask.bool())


# ----------------------------------------------------------------------------- model logits

def test_gpt2_layer_scaling_left_padding(calls):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        scale_attn_by_inverse_layer_idx=True, initializer_range=INIT)
    model = _causal_lm(config)
    ids, mask = _batch([6, 10], 10, "left")
    _compare_forward(model, calls, ids, mask)
    assert [c["softmax_scale"] for c in calls] == pytest.approx([16 ** -0.5, 16 ** -0.5 / 2])


@pytest.mark.parametrize("batch", ["one_unpadded", "three_right_padded"])
def test_llama_gqa(calls, batch):
    model = _causal_lm(_llama())
    ids, mask = _batch([9], 9, "right") if batch == "one_unpadded" else _batch([9, 4, 7], 9,
                                                                                "right")
    _compare_forward(model, calls, ids, mask)
    assert calls[0]["k"][1] == 2 and calls[0]["q"][1] == 4  # K/V handed over unrepeated
    if batch == "one_unpadded":  # no mask: the causal flag does the work
        assert calls[0]["attn_mask"] is None and calls[0]["causal"] is True


def test_mistral_sliding_window_shorter_than_sequence(calls):
    config = MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB,
                           sliding_window=4, initializer_range=INIT)
    model = _causal_lm(config)
    ids, mask = _batch([12, 8], 12, "left")
    _compare_forward(model, calls, ids, mask)


def test_qwen2_full_and_sliding_layers(calls):
    config = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         use_sliding_window=True, sliding_window=3, max_window_layers=1,
                         initializer_range=INIT)
    model = _causal_lm(config)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids, mask = _batch([10, 7], 10, "right")
    _compare_forward(model, calls, ids, mask)


def test_gemma2_softcap_and_sliding_window(calls):
    config = Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          vocab_size=VOCAB, sliding_window=4, attn_logit_softcapping=1.5,
                          query_pre_attn_scalar=8, initializer_range=INIT)
    model = _causal_lm(config)
    ids, mask = _batch([11, 8], 11, "left")
    _compare_forward(model, calls, ids, mask)
    assert [c["softcap"] for c in calls] == [1.5, 1.5]


def test_bert_bidirectional_with_padding(calls):
    config = BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                        num_attention_heads=2, vocab_size=VOCAB, initializer_range=INIT,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    ids, mask = _batch([8, 5], 8, "right")
    _compare_forward(model, calls, ids, mask, output="last_hidden_state")
    assert calls[0]["causal"] is False


# ----------------------------------------------------------------------------- caches

@pytest.mark.parametrize("cache,lengths", [("dynamic", [5, 8]), ("static", [5, 8]),
                                           ("static", [8])])
def test_greedy_generate_matches_eager(calls, cache, lengths):
    model = _causal_lm(_llama(num_key_value_heads=1))  # MQA
    ids, mask = _batch(lengths, 8, "left")
    options = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache_implementation=cache)
    ref = model.generate(ids, **options)
    with patch_hf_model(model):
        ours = model.generate(ids, **options)
    assert torch.equal(ours, ref)
    decode = [c for c in calls if c["q"][2] == 1]
    assert len(decode) == 2 and all(c["causal"] is False for c in decode)
    if cache == "static":  # K/V of the whole static cache arrive
        assert all(c["k"][2] > ids.shape[1] for c in decode)
    prefill = calls[0]
    if cache == "static" and prefill["attn_mask"] is None:
        # empty-StaticCache prefill that recent transformers sends without a mask: the
        # first Sq keys, causal (older versions send a mask, which then decides)
        assert prefill["causal"] is True and prefill["k"][2] == prefill["q"][2] == 8


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_chunked_prefill_on_a_cache(calls, cache):
    model = _causal_lm(_llama())
    ids, mask = _batch([12, 9], 12, "left")

    def run():
        past = (DynamicCache(config=model.config) if cache == "dynamic"
                else StaticCache(config=model.config, max_cache_len=16))
        first = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], past_key_values=past,
                      use_cache=True).logits
        second = model(input_ids=ids[:, 7:], attention_mask=mask, past_key_values=past,
                       use_cache=True).logits
        return torch.cat([first, second], dim=1)

    with torch.no_grad():
        ref = run()
        with patch_hf_model(model):
            ours = run()
    _assert_close(ours, ref, mask.bool())
    assert calls[1]["q"][2] == 5 and calls[1]["k"][2] == (12 if cache == "dynamic" else 16)


# ----------------------------------------------------------------------------- call rules

class _Layer(torch.nn.Module):
    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal


def _expected(q, k, v, allowed: torch.Tensor, scale: float, softcap: float = 0.0):
    """Eager attention in float64 on BHSD with a bool (Sq, Sk) or (B, 1, Sq, Sk) mask."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).float()


def _qkv(batch: int, sq: int, sk: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 4, sq, 8) * 2, torch.randn(batch, 2, sk, 8) * 2,
            torch.randn(batch, 2, sk, 8))


def _positions(sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(sq)[:, None], torch.arange(sk)[None, :]


@pytest.mark.parametrize("case", ["static_prefill", "is_causal_kwarg_wins", "decode",
                                  "sliding_window", "mask_decides", "softcap"])
def test_call_rules(case):
    sq, sk, scale, softcap = 5, 5, 0.3, 0.0
    kwargs: dict = {"s_aux": None, "position_ids": torch.arange(sq)}  # None: feature off
    layer = _Layer(is_causal=True)
    mask = None
    if case == "static_prefill":  # no mask, Sk > Sq: SDPA's top-left causal = first Sq keys
        sk = 9
        qi, kj = _positions(sq, sk)
        allowed = kj <= qi
    elif case == "is_causal_kwarg_wins":
        kwargs["is_causal"] = False
        allowed = torch.ones(sq, sk, dtype=torch.bool)
    elif case == "decode":  # Sq = 1 sees the whole cache
        sq, sk = 1, 7
        allowed = torch.ones(sq, sk, dtype=torch.bool)
    elif case == "sliding_window":  # transformers' window counts the query itself
        sq = sk = 7
        kwargs["sliding_window"] = 3
        qi, kj = _positions(sq, sk)
        allowed = (kj <= qi) & (kj > qi - 3)
    elif case == "mask_decides":  # a causal layer, but the mask lets row 0 see key 3
        kwargs["sliding_window"] = 2
        mask = torch.rand(2, 1, sq, sk) > 0.4
        mask[:, :, :, 0] = True
        mask[:, :, 0, 3] = True
        allowed = mask
    else:
        softcap = 0.7
        kwargs["softcap"] = softcap
        qi, kj = _positions(sq, sk)
        allowed = kj <= qi
    q, k, v = _qkv(2, sq, sk)
    out, weights = hf.triton_fa_attention(layer, q, k, v, mask, scaling=scale, dropout=0.0,
                                          **kwargs)
    assert weights is None and out.shape == (2, sq, 4, 8)
    expected = _expected(q, k, v, allowed, scale, softcap)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,value,message", [
    ("s_aux", torch.zeros(4), "s_aux"),
    ("position_bias", torch.zeros(1, 4, 5, 5), "position_bias"),
    ("cache", object(), "cache"),
    ("cu_seq_lens_q", torch.tensor([0, 2, 5], dtype=torch.int32), "2 packed sequences"),
])
def test_result_changing_kwargs_raise(name, value, message):
    q, k, v = _qkv(1, 5, 5)
    with pytest.raises(ValueError, match=message):
        hf.triton_fa_attention(_Layer(True), q, k, v, None, scaling=0.3, **{name: value})


def test_bad_masks_and_dropout_raise():
    q, k, v = _qkv(2, 5, 5)
    with pytest.raises(ValueError, match="4-D mask"):
        hf.triton_fa_attention(_Layer(True), q, k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        hf.triton_fa_attention(_Layer(True), q, k, v, None, dropout=0.1)


def test_output_attentions_raises():
    model = AutoModelForCausalLM.from_config(_llama(), attn_implementation="triton_fa")
    with pytest.raises(ValueError, match="output_attentions"):
        model(torch.randint(3, VOCAB, (1, 4)), output_attentions=True)


def test_output_attentions_in_config_raises():
    # set while the model ran eager, then switched: only the layers' config says it
    model = _causal_lm(_llama())
    model.config.output_attentions = True
    model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="output_attentions"):
        model(torch.randint(3, VOCAB, (1, 4)))
    model.config.output_attentions = False  # the flag is read at every call
    assert model(torch.randint(3, VOCAB, (1, 4))).logits.isfinite().all()
    # a layer whose config is of another class (no transformers property storage)
    q, k, v = _qkv(2, 5, 5)
    layer = _Layer(True)
    layer.config = types.SimpleNamespace(output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        hf.triton_fa_attention(layer, q, k, v, None)
    layer.config.output_attentions = False
    assert hf.triton_fa_attention(layer, q, k, v, None)[0].isfinite().all()


def test_training_dropout_raises_and_gradients_match(calls):
    model = _causal_lm(_llama(attention_dropout=0.1)).train()
    # right padding, padded labels ignored: padded query rows (eager: mean of all values,
    # ours: 0) reach no loss term
    ids, mask = _batch([7, 5], 7, "right")
    labels = ids.masked_fill(mask == 0, -100)
    with patch_hf_model(model), pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=ids, attention_mask=mask)
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ref = grads()
    with patch_hf_model(model):
        ours = grads()
    assert calls
    attn = "model.layers.0.self_attn.q_proj.weight"
    assert ref[attn].abs().max() > 1e-3
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- registration

def test_import_registers_triton_fa(calls):
    assert AttentionInterface._global_mapping["triton_fa"] is hf.triton_fa_attention
    assert AttentionMaskInterface._global_mapping["triton_fa"] is sdpa_mask
    model = AutoModelForCausalLM.from_config(_llama(), attn_implementation="triton_fa").eval()
    assert model.config._attn_implementation == "triton_fa"
    with torch.no_grad():
        ours = model(torch.randint(3, VOCAB, (1, 6))).logits
    assert len(calls) == 1 and torch.isfinite(ours).all()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("triton_fa")
    assert model.config._attn_implementation == "triton_fa"


def test_import_without_transformers():
    code = textwrap.dedent("""
        import importlib.metadata, sys
        real_version = importlib.metadata.version
        def version(name):
            if name == "transformers":
                raise importlib.metadata.PackageNotFoundError(name)
            return real_version(name)
        importlib.metadata.version = version
        sys.modules["transformers"] = None  # any import of transformers fails
        import flashattn_modules
        try:
            flashattn_modules.register()
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ImportError:" in done.stdout and "flashattn-modules[hf]" in done.stdout


def test_old_transformers_is_refused(monkeypatch):
    # transformers' lazy module may have been replaced in sys.modules since this file's import
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.3.1")
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.4, found 5\.3\.1"):
        flashattn_modules.register()
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.4"):
        patch_hf_model(_causal_lm(_llama()))
    # importing with an old transformers installed registers nothing and raises nothing
    monkeypatch.delitem(AttentionInterface._global_mapping, "triton_fa")
    monkeypatch.setattr(hf.importlib.metadata, "version", lambda name: "4.57.0")
    hf.register_if_available()
    assert "triton_fa" not in AttentionInterface._global_mapping


def test_hugging_face_kernels_package_is_refused(monkeypatch):
    """Hugging Face's ``kernels`` distribution shares our ``kernels`` import name: register,
    patch and import say so instead of failing inside transformers."""
    from transformers.utils import import_utils

    real_version = hf.importlib.metadata.version
    monkeypatch.setattr(hf.importlib.metadata, "version",
                        lambda name: "0.19.1" if name == "kernels" else real_version(name))
    monkeypatch.setattr(import_utils, "is_kernels_available", lambda: True)
    clash = r"Hugging Face's 'kernels' package \(0\.19\.1\) is installed.*transformers < 5\.25"
    with pytest.raises(ImportError, match=clash):
        flashattn_modules.register()
    model = _causal_lm(_llama())
    with pytest.raises(ImportError, match=clash):
        patch_hf_model(model)
    assert model.config._attn_implementation != "triton_fa"
    monkeypatch.delitem(AttentionInterface._global_mapping, "triton_fa")
    with pytest.warns(RuntimeWarning, match=r"triton_fa was not registered.*'kernels' package"):
        hf.register_if_available()
    assert "triton_fa" not in AttentionInterface._global_mapping


# ----------------------------------------------------------------------------- patching

def _tiny_llava(attn_implementation) -> torch.nn.Module:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=8, patch_size=4)
    config = LlavaConfig(text_config=_llama(), vision_config=vision, image_token_index=VOCAB - 1)
    return LlavaForConditionalGeneration._from_config(config,
                                                      attn_implementation=attn_implementation)


def _implementations(model) -> list:
    config = model.config
    return [config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation]


def test_patch_unpatch_restores_every_sub_config_exactly():
    model = _tiny_llava({"": "sdpa", "text_config": "eager", "vision_config": "sdpa"})
    before = _implementations(model)
    assert before == ["sdpa", "eager", "sdpa"]
    handle = patch_hf_model(model)
    assert _implementations(model) == ["triton_fa"] * 3 and handle.active
    with pytest.raises(RuntimeError, match="already patched"):
        patch_hf_model(model)
    unpatch_hf_model(model)
    assert _implementations(model) == before and not handle.active
    handle.restore()  # already restored: nothing happens
    with pytest.raises(ValueError, match="not patched"):
        unpatch_hf_model(model)
    with pytest.raises(KeyError), patch_hf_model(model) as patched:
        assert patched is model and _implementations(model) == ["triton_fa"] * 3
        raise KeyError("the with block fails")
    assert _implementations(model) == before


def test_patched_sdpa_model_runs_our_kernel_until_unpatched(calls):
    model = AutoModelForCausalLM.from_config(_llama(num_hidden_layers=2),
                                             attn_implementation="sdpa").eval()
    ids, mask = _batch([6, 4], 6, "right")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        handle = patch_hf_model(model)
        ours = model(input_ids=ids, attention_mask=mask).logits
        assert len(calls) == 2
        handle.restore()
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2 and model.config._attn_implementation == "sdpa"
    _assert_close(ours, ref, mask.bool())


_OLD_STYLE_MODEL = '''
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


class OldStyleConfig(PreTrainedConfig):
    model_type = "old_style_for_flashattn_tests"


class OldStyleAttention(nn.Module):
    def forward(self, hidden_states):
        return hidden_states


class OldStyleModel(PreTrainedModel):
    config_class = OldStyleConfig

    def __init__(self, config):
        super().__init__(config)
        self.attention = OldStyleAttention()
        self.post_init()
'''


def test_patch_refuses_models_outside_the_attention_interface(tmp_path, monkeypatch):
    (tmp_path / "old_style_model_for_flashattn.py").write_text(_OLD_STYLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("old_style_model_for_flashattn")
    model = module.OldStyleModel(module.OldStyleConfig())
    with pytest.raises(RuntimeError, match="OldStyleModel does not route its attention"):
        patch_hf_model(model)
    with pytest.raises(TypeError, match="PreTrainedModel, got Linear"):
        patch_hf_model(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- GPU

_GPU_FAMILIES = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=512,
                               n_positions=256, scale_attn_by_inverse_layer_idx=True),
    "llama": lambda: _llama(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                            initializer_range=0.05),
    "mistral": lambda: MistralConfig(num_hidden_layers=2, hidden_size=256,
                                     intermediate_size=512, num_attention_heads=4,
                                     num_key_value_heads=1, vocab_size=512, sliding_window=48,
                                     initializer_range=0.05),
    "gemma2": lambda: Gemma2Config(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   vocab_size=512, sliding_window=48, initializer_range=0.05),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(_GPU_FAMILIES))
def test_gpu_half_precision_logits(gpu_device, family, dtype):
    """Ours in fp16/bf16 is no further from the fp32 eager logits than transformers' own
    half-precision attention (SDPA; eager for Gemma-2, whose softcap SDPA refuses)."""
    config = _GPU_FAMILIES[family]()
    peer = "eager" if family == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(gpu_device).eval()
    ids = torch.randint(3, config.vocab_size, (2, 128), device=gpu_device)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    valid = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.float()
        model.to(dtype)
        model.set_attn_implementation(peer)
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
        with patch_hf_model(model):
            ours = model(input_ids=ids, attention_mask=mask).logits.float()
    err_ours = (ours - ref)[valid].abs().max().item()
    err_theirs = (theirs - ref)[valid].abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpu_fp32_generate_matches_sdpa(gpu_device, cache):
    """fp32 greedy decoding equals SDPA's, with a DynamicCache and with a StaticCache (whose
    decoding steps generate compiles on CUDA), left-padded batch of 3."""
    config = _llama(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(gpu_device).eval()
    ids = torch.randint(3, config.vocab_size, (3, 24), device=gpu_device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    options = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                   cache_implementation=cache)
    ref = model.generate(ids, **options)
    with patch_hf_model(model):
        ours = model.generate(ids, **options)
    assert torch.equal(ours, ref)
