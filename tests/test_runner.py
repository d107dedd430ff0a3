"""The lean LLaMA forward (spikeops.runner.Runner) against transformers' forward: the same
logits for a prompt, decode steps and multi-token chunks after a cached prefix, on a float
model and on a spiking one; a batch; its argument checks; generate() on top of it; the
static-shape decode step against the eager one, and on a GPU its CUDA graphs (skipped, with the
reason, elsewhere)."""

import copy

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import spikeops
from spikeops.evaluate import forward_step, generate
from spikeops.runner import Runner
from helpers import CUDA_REASON, cuda_ready


def hf_logits(model, ids, cache):
    return forward_step(model, ids, cache)


def assert_same_logits(model, ids, chunks):
    """Runner and HF on ``ids [B, T]`` cut into ``chunks`` (lengths); lm_head as the model's
    (head_dtype=None), so the logits are transformers' up to the attention's rounding."""
    runner = Runner(model, max_len=ids.shape[1] + 3, batch=ids.shape[0], head_dtype=None)
    cache, start = None, 0
    for n in chunks:
        expect, cache = hf_logits(model, ids[:, start:start + n], cache)
        got = runner(ids[:, start:start + n])
        torch.testing.assert_close(got, expect.float(), rtol=1e-5, atol=1e-5)
        start += n
    # last_only: the logits of the last token, lm_head skipped for the others
    runner.reset()
    torch.testing.assert_close(runner(ids, last_only=True), runner_full(model, ids)[:, -1:])


def runner_full(model, ids):
    return Runner(model, max_len=ids.shape[1], batch=ids.shape[0], head_dtype=None)(ids)


@pytest.fixture(scope="module")
def gqa_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=500.0)
    return LlamaForCausalLM(config).eval()


def test_float_model_matches_transformers(gqa_model):
    ids = torch.randint(0, 97, (1, 40))
    assert_same_logits(gqa_model, ids, [20, 1, 1, 5, 13])


def test_cached_keys_are_transformers_bit_for_bit(gqa_model):
    """The Runner's rotary product (roll and a signed sin) is transformers' apply_rotary_pos_emb
    bit for bit: the cached keys (after the rotary embedding) and values are equal."""
    ids = torch.randint(0, 97, (2, 9))
    runner, cache = Runner(gqa_model, 9, batch=2), None
    for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:]):  # a prompt, then steps: the same shapes
        runner(chunk)
        cache = hf_logits(gqa_model, chunk, cache)[1]
    for i, layer in enumerate(cache.layers):
        assert torch.equal(runner.keys[i], layer.keys)
        assert torch.equal(runner.values[i], layer.values)


def test_batch(gqa_model):
    ids = torch.randint(0, 97, (3, 12))
    assert_same_logits(gqa_model, ids, [8, 1, 3])


def test_spiking_model_matches_transformers(model, checkpoint):
    """A GPTQ checkpoint on spikes (q/k/v and gate/up sharing their encodings), whose
    layer inputs are bit-identical along both paths, so the spikes are too."""
    ids = torch.randint(0, 256, (1, 30))
    assert_same_logits(model, ids, [16, 1, 1, 12])


def test_runner_encodes_each_input_once(model, monkeypatch):
    """The Runner calls q/k/v through their ProjectionGroup: 4 encodings per decoder layer
    (q/k/v, o, gate/up, down), as transformers' forward of the loaded model."""
    import spikeops.nn as nn_module
    calls = []
    real = nn_module.encode_rows
    monkeypatch.setattr(nn_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner = Runner(model, max_len=8)
    runner(torch.randint(0, 256, (1, 5)))
    assert len(calls) == 4 * len(model.model.layers)


def test_rotated_model_with_online_rotation(gqa_model):
    """A rotated model carries an online rotation (a pre-hook on down_proj): the Runner calls
    the modules, so the hook runs."""
    import copy
    from spikeops.transforms import transform
    rotated = copy.deepcopy(gqa_model)
    transform(rotated, "rotate")
    ids = torch.randint(0, 97, (1, 10))
    assert_same_logits(rotated, ids, [9, 1])
    torch.testing.assert_close(runner_full(rotated, ids), runner_full(gqa_model, ids),
                               rtol=1e-4, atol=1e-4)


def test_generate_uses_the_runner_and_keeps_the_tokens(gqa_model, monkeypatch):
    calls = []
    run = Runner.__call__
    monkeypatch.setattr(Runner, "__call__",
                        lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    prompt = torch.randint(0, 97, (7,))
    ids, cache, expect = prompt[None], None, []
    for _ in range(6):  # greedy decoding through transformers' own cache
        logits, cache = forward_step(gqa_model, ids, cache)
        expect.append(int(logits[0, -1].argmax()))
        ids = torch.tensor([[expect[-1]]])
    assert generate(gqa_model, prompt, max_new_tokens=6).tolist() == expect
    assert len(calls) == 6


def test_rejects(gqa_model):
    with pytest.raises(TypeError, match="model"):
        Runner("llama", 8)
    with pytest.raises(ValueError, match="LLaMA-architecture"):
        Runner(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="max_len"):
        Runner(gqa_model, 0)
    with pytest.raises(ValueError, match="batch"):
        Runner(gqa_model, 8, batch=0)
    runner = Runner(gqa_model, 8)
    with pytest.raises(TypeError, match="ids"):
        runner(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ids"):
        runner(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids"):
        runner(torch.zeros(1, 0, dtype=torch.int64))
    runner(torch.zeros(1, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_len"):
        runner(torch.zeros(1, 3, dtype=torch.int64))
    sliding = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2))
    sliding.config.sliding_window = 4
    with pytest.raises(ValueError, match="full attention"):
        Runner(sliding, 8)


def test_head_dtype_runs_lm_head_in_that_dtype(gqa_model, model):
    """head_dtype=bfloat16: the final hidden state (transformers' own, bit for bit) times the
    bfloat16 copy of lm_head's weight, as F.linear computes it in bfloat16."""
    import torch.nn.functional as F
    ids = torch.randint(0, 97, (2, 7))
    fast = Runner(gqa_model, 7, batch=2, head_dtype=torch.bfloat16)(ids)
    with torch.no_grad():
        hidden = gqa_model.model(input_ids=ids).last_hidden_state
        expected = F.linear(hidden.bfloat16(), gqa_model.lm_head.weight.bfloat16()).float()
    assert fast.dtype == torch.float32 and torch.equal(fast, expected)
    torch.testing.assert_close(fast, runner_full(gqa_model, ids), rtol=0.05, atol=0.05)
    prompt = torch.randint(0, 256, (6,))
    with spikeops.track(model) as tracker:  # lm_head's hooks still see the bfloat16 head
        assert generate(model, prompt, 3, head_dtype=torch.bfloat16).shape == (3,)
    head = model.lm_head
    assert tracker.whole_model()["dense_macs"]["lm_head"] == \
        3 * head.in_features * head.out_features
    with pytest.raises(ValueError, match="head_dtype"):
        Runner(gqa_model, 7, head_dtype=torch.int8)
    qwen = LlamaForCausalLM(copy.deepcopy(gqa_model.config))  # the fixture's config stays llama
    qwen.config.model_type = "qwen3"
    with pytest.raises(ValueError, match="generate: head_dtype needs a model the Runner runs"):
        generate(qwen, prompt.remainder(97), 1, head_dtype=torch.bfloat16)


def test_head_dtype_auto_is_float16_where_it_provably_holds(gqa_model):
    """The default head ("auto"): a float32 head runs in float16 when the weights bound every
    hidden value and logit well inside float16's range (runner.auto_head_dtype), bit for bit the
    explicit float16 head; past the bound in bfloat16; a head already in 16 bits as it is."""
    from spikeops.runner import auto_head_dtype
    ids = torch.randint(0, 97, (2, 7))
    auto = Runner(gqa_model, 7, batch=2)
    assert auto.head_dtype == torch.float16
    assert torch.equal(auto(ids), Runner(gqa_model, 7, batch=2, head_dtype=torch.float16)(ids))
    torch.testing.assert_close(Runner(gqa_model, 7, batch=2)(ids), runner_full(gqa_model, ids),
                               rtol=1e-2, atol=1e-2)
    # The bounds: 2 * sqrt(d) * max|g| (hidden values) times max(1, max_j ||W_j||) (logits)
    # against float16's 65,504.
    norm, head = gqa_model.model.norm, gqa_model.lm_head
    d = head.in_features
    rows = max(1.0, float(head.weight.norm(dim=1).max()))
    big = copy.deepcopy(gqa_model)
    with torch.no_grad():
        for factor, expect in ((0.99, torch.float16), (1.01, torch.bfloat16)):
            big.model.norm.weight.fill_(factor * 65504 / (2 * d ** 0.5 * rows))
            assert auto_head_dtype(big.model.norm, big.lm_head) == expect
        big.model.norm.weight.fill_(1e4)  # hidden values near float16's limit: bfloat16
        assert Runner(big, 7, batch=2).head_dtype == torch.bfloat16
        assert torch.isfinite(Runner(big, 7, batch=2)(ids)).all()
    assert auto_head_dtype(norm, copy.deepcopy(head).bfloat16()) is None
    assert auto_head_dtype(torch.nn.LayerNorm(d), head) == torch.bfloat16  # no RMSNorm: no proof
    assert Runner(gqa_model, 7, head_dtype=None).head_dtype is None
    with pytest.raises(ValueError, match="head_dtype must be 'auto', None or one of"):
        Runner(gqa_model, 7, head_dtype="fast")
    with pytest.raises(ValueError, match="generate: head_dtype must be 'auto'"):
        generate(gqa_model, ids[0], 1, head_dtype="fast")


# ----------------------------------------------------------------------------- spiking KV cache
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kv", ["spike4", "spike8"])
def test_spike_kv_cache_holds_encoded_keys_and_values(gqa_model, kv, rotate):
    """Every cached token is its float key (after the rotary embedding, less the key offset: the
    mean of the prompt's keys, divided by the key channel scale: each channel's largest
    magnitude over the prompt, at least 1/16 of the widest channel's) or value, rotated by the
    Hadamard matrix when asked, encoded once per token and head (keys under
    attention.KEY_ENCODINGS, rounded alone: the tiny model has no query moments; values absmax):
    bit for bit the encoding of what the float cache holds,
    whether written by a prompt or by decode steps (layer 0: the later layers' inputs depend on
    the quantized attention before them)."""
    from spikeops.attention import KEY_ENCODINGS
    from spikeops.transforms import hadamard
    ids = torch.randint(0, 97, (2, 11))
    ref = Runner(gqa_model, max_len=16, batch=2)
    run = Runner(gqa_model, max_len=16, batch=2, kv=kv, kv_rotate=rotate)
    for chunk in (ids[:, :8], ids[:, 8:9], ids[:, 9:]):
        ref(chunk)
        run(chunk)
    bits = int(kv[5:])
    H = hadamard(ref.head_dim).float() if rotate else torch.eye(ref.head_dim)
    layer = run.spike_kv[0]
    keys = ref.keys[0][:, :, :11] @ H
    offset = keys[:, :, :8].mean(dim=2, keepdim=True)
    assert torch.equal(layer.key_offset, offset)
    span = (keys[:, :, :8] - offset).abs().amax(2, keepdim=True)
    scale = torch.maximum(span, span.amax(3, keepdim=True) / 16)
    assert torch.equal(layer.key_scale, scale)
    for cache, floats, enc in (
            (layer.keys, (keys - offset) / scale, KEY_ENCODINGS[bits]),
            (layer.values, ref.values[0][:, :, :11] @ H, spikeops.Encoding("absmax", bits))):
        expect = spikeops.fake_quantize(floats, enc)
        assert torch.equal(cache.decode(11, torch.float32), expect)


def test_spike_kv_logits(gqa_model):
    """Attention on the 8-bit cache stays close to the float cache, and tokens after the prompt
    give the same logits in one call or in decode steps (each token is encoded alone; the key
    offset is the prompt's)."""
    ids = torch.randint(0, 97, (1, 24))
    full = Runner(gqa_model, max_len=24)(ids)
    spike = Runner(gqa_model, max_len=24, kv="spike8")
    torch.testing.assert_close(spike(ids), full, rtol=0.05, atol=0.05)
    spike.reset()
    whole = torch.cat([spike(ids[:, :20]), spike(ids[:, 20:])], 1)
    spike.reset()
    steps = torch.cat([spike(ids[:, :20])] + [spike(ids[:, t:t + 1]) for t in range(20, 24)], 1)
    torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5)
    # A left-padded row: the key offset is its real tokens' mean, so its logits are its own.
    alone = Runner(gqa_model, max_len=24, kv="spike8")(ids[:, 4:])
    padded = Runner(gqa_model, max_len=24, batch=2, kv="spike8")(
        torch.cat([ids, torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids[:, 4:]], 1)]),
        pad=torch.tensor([0, 4]))
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_cache_bytes_per_token(gqa_model):
    # 3 layers, 2 kv heads, head_dim 8 (one word), float32 embedding
    L, Hkv, D = 3, 2, 8
    assert Runner(gqa_model, 8).cache_bytes_per_token() == 2 * L * Hkv * D * 4
    for kv, P in (("spike4", 4), ("spike8", 8)):
        # keys (minmax): P plane words, a float32 scale and an int32 zero per token and head;
        # values (absmax, channel-major): P - 1 planes and the sign, a bit each per channel, and
        # a float32 scale per token and head
        keys = P * 4 + 4 + 4
        values = P * D // 8 + 4
        assert Runner(gqa_model, 8, kv=kv).cache_bytes_per_token() == L * Hkv * (keys + values)
    assert Runner(gqa_model, 8, batch=3, kv="spike4").cache_bytes_per_token() == \
        3 * Runner(gqa_model, 8, kv="spike4").cache_bytes_per_token()


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(kv="spike3"), ValueError, "kv"),
    (dict(kv="spike4", kv_rotate=1), TypeError, "kv_rotate"),
    (dict(kv_rotate=True), ValueError, "kv_rotate"),
    (dict(kv_pv="spike"), ValueError, "kv_pv"),
    (dict(kv="spike4", kv_pv="int"), ValueError, "kv_pv"),
])
def test_spike_kv_rejects(gqa_model, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Runner(gqa_model, 8, **kw)


def test_spike_kv_rotation_needs_power_of_two_head_dim():
    config = LlamaConfig(vocab_size=17, hidden_size=24, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        Runner(model, 8, kv="spike4")
    Runner(model, 8, kv="spike4", kv_rotate=False)(torch.randint(0, 17, (1, 3)))


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kv", ["spike4", "spike8"])
def test_spike_attention_against_float64(kv, rotate):
    """SpikeKV.attend: QK^T on spikes equals the float64 product of the decoded queries (times
    the key channel scale, 8-bit, per token and head) and keys to float32 rounding, so with a
    float64 softmax and PV on the decoded values the outputs agree to 1e-5; PV on spikes (8-bit
    probabilities) to 1e-2 of max |v|. Grouped-query heads, a causal mask over a partly filled cache."""
    from spikeops.attention import QUERY_ENCODING, SpikeKV
    from spikeops.transforms import hadamard
    B, H, Hkv, D, L, T, end = 2, 4, 2, 32, 12, 3, 10
    k, v = torch.randn(B, Hkv, end, D), torch.randn(B, Hkv, end, D)
    q = torch.randn(B, H, T, D)
    mask = torch.ones(T, end, dtype=torch.bool).tril(end - T)
    R = hadamard(D).float() if rotate else torch.eye(D)
    for pv, tol in (("float", 1e-5), ("spike", 1e-2)):
        kvc = SpikeKV("test", kv, rotate, pv, B, Hkv, L, D, torch.float32, "cpu")
        kvc.write(k[:, :, :7], v[:, :, :7], 0)
        kvc.write(k[:, :, 7:], v[:, :, 7:], 7)
        got = kvc.attend(q, end, mask, 0.125)
        scale = kvc.key_scale.repeat_interleave(H // Hkv, 1)
        qd = spikeops.fake_quantize(q @ R * scale, QUERY_ENCODING).double()
        kd = kvc.keys.decode(end, torch.float32).double().repeat_interleave(H // Hkv, 1)
        vd = kvc.values.decode(end, torch.float32).double().repeat_interleave(H // Hkv, 1)
        scores = (qd @ kd.transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
        ref = scores.softmax(-1) @ vd @ R.double().T
        err = (got.double() - ref).abs().max()
        assert err <= tol * vd.abs().max(), (pv, err)


def test_key_channel_scale():
    """The key channel scale evens the channels' ranges in the 4-bit key code: keys with four
    outlier channels 30x wider than the rest (no rotation to spread them) give scores
    q.(k - mu) at least 1.5x closer to the float ones than the same code without it (1.8x
    here); a channel constant over the prompt gets 1/16 of the widest channel's scale, a
    one-token prompt the scale 1."""
    from spikeops.attention import KEY_ENCODINGS, QUERY_ENCODING, SpikeKV
    torch.manual_seed(0)
    B, Hkv, D, L = 1, 1, 64, 300
    k = torch.randn(B, Hkv, 256, D)
    k[..., :4] *= 30
    q, v = torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 256, D)
    kvc = SpikeKV("test", "spike4", False, "float", B, Hkv, L, D, torch.float32, "cpu")
    kvc.write(k, v, 0)
    exact = q.double() @ (k - kvc.key_offset).double().transpose(-1, -2)
    keys = kvc.keys.decode(256, torch.float32).double()
    scaled = spikeops.fake_quantize(q * kvc.key_scale, QUERY_ENCODING).double()
    plain = spikeops.fake_quantize(q, QUERY_ENCODING).double() @ spikeops.fake_quantize(
        k - kvc.key_offset, KEY_ENCODINGS[4]).double().transpose(-1, -2)
    assert (scaled @ keys.transpose(-1, -2) - exact).abs().mean() * 1.5 < (plain - exact).abs().mean()

    k[..., 5] = 2.5  # constant over the prompt
    kvc.write(k, v, 0)
    assert kvc.key_scale[..., 5].item() == kvc.key_scale.amax().item() / 16
    kvc.write(k[:, :, :1], v[:, :, :1], 0)
    assert torch.equal(kvc.key_scale, torch.ones(B, Hkv, 1, D))
    out = kvc.attend(torch.randn(B, 2, 1, D), 1, None, 0.125)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kv", ["spike4", "spike8"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("moment", [False, True])
def test_spike_kv_step_is_write_then_attend(monkeypatch, kv, threads, rotate, moment):
    """SpikeKV.step (the Runner's: the rotations of q, k and v as one product, and after the
    prompt the C++ step, _C.direct_spike_kv_step) gives the bits of write then attend (three
    products, Python's operations), outputs and caches: a prompt of 1,000 tokens with padding
    (the Runner's mask), then steps of 1, 2 and 1 tokens, with 1 and 2 threads (a row of a
    product does not depend on the rows beside it), with and without a query moment (the keys'
    error feedback); the C++ step ran for each of the three."""
    from spikeops import attention
    from spikeops.attention import SpikeKV
    direct = attention._C.direct_spike_kv_step
    calls = []
    monkeypatch.setattr(attention._C, "direct_spike_kv_step",
                        lambda *a: calls.append(a[4]) or direct(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        B, H, Hkv, D, L = 2, 9, 3, 64, 1006
        pad = torch.tensor([0, 5])
        A = torch.randn(Hkv, D, D) * torch.logspace(0, -2, D)
        m = A @ A.transpose(1, 2) if moment else None
        one = SpikeKV("test", kv, rotate, "spike", B, Hkv, L, D, torch.float32, "cpu",
                      query_moment=m)
        two = SpikeKV("test", kv, rotate, "spike", B, Hkv, L, D, torch.float32, "cpu",
                      query_moment=m)
        start = 0
        for T in (1000, 1, 2, 1):
            q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
            end = start + T
            keys, query = torch.arange(end), torch.arange(start, end).unsqueeze(1)
            mask = ((keys <= query) & (keys >= pad.view(B, 1, 1)) | (keys == query)).unsqueeze(1)
            got = one.step(q, k, v, start, end, mask, 0.125, pad if start == 0 else None)
            two.write(k, v, start, pad if start == 0 else None)
            assert torch.equal(got, two.attend(q, end, mask, 0.125)), (T, start)
            for name in ("planes", "scale", "zero"):
                assert torch.equal(getattr(one.keys, name), getattr(two.keys, name)), name
            for name in ("bits", "scale"):
                assert torch.equal(getattr(one.values, name), getattr(two.values, name)), name
            start = end
        assert (one.key_feedback is not None) == moment
    finally:
        torch.set_num_threads(before)
    assert calls == [1000, 1001, 1003]


def test_query_moment_feedback_codes_the_keys():
    """With a query moment the key cache holds feedback_encode's codes of the keys (less the
    offset, over the channel scale, rotated) under key_feedback's matrices, which differ from
    gif_encode's; a moment of another shape is refused."""
    from spikeops import ops
    from spikeops.attention import KEY_ENCODINGS, SpikeKV, key_feedback
    B, Hkv, D, T = 2, 3, 64, 40
    A = torch.randn(Hkv, D, D) * torch.logspace(0, -2, D)
    m = A @ A.transpose(1, 2)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    kvc = SpikeKV("test", "spike4", True, "spike", B, Hkv, 50, D, torch.float32, "cpu",
                  query_moment=m)
    kvc.write(k, v, 0)
    F = key_feedback(m, kvc.key_scale, kvc.rotation)
    assert torch.equal(kvc.key_feedback, F)
    rows = ((k @ kvc.rotation - kvc.key_offset) / kvc.key_scale).reshape(B * Hkv, T, D)
    enc = KEY_ENCODINGS[4]
    planes, scale, zero = ops.feedback_encode(rows, F, enc.bits, enc.gamma)
    P, W = planes.shape[0], planes.shape[-1]
    assert torch.equal(kvc.keys.planes.view(P, B, Hkv, 50, W)[:, :, :, :T],
                       planes.view(P, B, Hkv, T, W))
    assert torch.equal(kvc.keys.zero.view(B, Hkv, 50)[:, :, :T], zero.view(B, Hkv, T))
    plain = ops.gif_encode(rows.reshape(-1, D), enc.mode, enc.bits, enc.gamma)[0]
    assert not torch.equal(plain, planes)
    with pytest.raises(ValueError, match=r"query moment must have shape \[kv_heads, head_dim"):
        SpikeKV("test", "spike4", True, "spike", B, Hkv, 50, D, torch.float32, "cpu",
                query_moment=m[:2])


def test_runner_announces_keys_without_query_moments(gqa_model):
    """A spiking cache over a model whose calibration has no query moments says so (its keys
    are coded without the error feedback); a float cache does not."""
    with pytest.warns(UserWarning, match="have no query moment"):
        Runner(gqa_model, max_len=8, kv="spike4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runner(gqa_model, max_len=8)


def test_runner_decode_takes_the_one_call_step(gqa_model, monkeypatch):
    """A Runner's decode steps with a spiking cache (PV on spikes) run the C++ step, one call
    per layer and step, and its prompt does not (the prompt sets the key offset and scale); with
    PV in float, or statistics observing QK^T, the Python path runs."""
    from spikeops import attention
    direct = attention._C.direct_spike_kv_step
    calls = []
    monkeypatch.setattr(attention._C, "direct_spike_kv_step",
                        lambda *a: calls.append(a[4]) or direct(*a))
    ids = torch.randint(0, 97, (1, 7))
    layers = gqa_model.config.num_hidden_layers
    runner = Runner(gqa_model, max_len=8, kv="spike4")
    runner(ids[:, :5])
    assert calls == []
    runner(ids[:, 5:6])
    runner(ids[:, 6:7])
    assert calls == [5] * layers + [6] * layers
    calls.clear()
    runner = Runner(gqa_model, max_len=8, kv="spike4", kv_pv="float")
    runner(ids[:, :5])
    runner(ids[:, 5:6])
    assert calls == []
    class Events(list):
        def add(self, sops, macs):
            self.append(macs)
    events = Events()
    attention.observe(gqa_model, events.add)
    try:
        runner = Runner(gqa_model, max_len=8, kv="spike4")
        runner(ids[:, :5])
        runner(ids[:, 5:6])
    finally:
        attention.unobserve(events.add)
    assert calls == [] and len(events) == 2 * layers


def test_value_cache_channel_major():
    """The channel-major value cache holds, after writes that start and end inside 32-token
    words, the absmax encoding of every token (decoded, bit for bit), and a rewrite from token 0
    (a new sequence) clears the later tokens' bits in the words it writes (a later word is
    cleared when its first token is written); PV on it equals the float64 product of the
    8-bit probabilities and the decoded values within float32 rounding."""
    from spikeops.attention import ValueCache, SpikeKV
    enc = spikeops.Encoding("absmax", 4)
    cache = ValueCache(enc, 2, 3, 100, 64, "cpu")
    x = torch.randn(2, 3, 100, 64)
    for start, end in ((0, 37), (37, 38), (38, 70), (70, 100)):
        cache.write(x[:, :, start:end], start)
        assert torch.equal(cache.decode(end, torch.float32),
                           spikeops.fake_quantize(x[:, :, :end], enc))
    cache.write(x[:, :, :5] * 2, 0)
    assert torch.equal(cache.decode(5, torch.float32), spikeops.fake_quantize(x[:, :, :5] * 2, enc))
    assert not cache.planes[:, :, 0].bitwise_and(-32).any()  # tokens 5..31 of word 0
    kv = SpikeKV("t", "spike4", False, "spike", 2, 3, 100, 64, torch.float32, "cpu")
    kv.values = cache
    probs = torch.softmax(torch.randn(2, 6, 2, 5), -1)
    out = kv.spike_pv(probs, 5)
    weights = probs * cache.token_scales(5).repeat_interleave(2, 1).unsqueeze(2)
    step = weights.amax(-1, keepdim=True) / 255
    q = torch.round(weights / step).double() * step.double()
    codes = cache.decode(5, torch.float64) / cache.token_scales(5).unsqueeze(-1).double()
    exact = q @ codes.repeat_interleave(2, 1)  # the scales are inside the 8-bit weights
    assert out.shape == (2, 6, 2, 64)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- static decode, CUDA graphs
def static_runner(model, max_len, batch=1):
    """A Runner whose one-token steps take the static-shape step (what a CUDA graph holds), run
    eagerly: the CPU has no graphs, and cuda_graphs=True would refuse it."""
    runner = Runner(model, max_len, batch=batch, head_dtype=None)
    runner._static = True
    return runner


def assert_static_steps_match(eager, static, ids, prompt, pad=None):
    """Prompt, then one-token steps through both Runners: layer 0's cache (its keys and values
    depend on the ids and positions only) bit for bit, logits to float32 rounding (the static
    step's attention also sums the span's masked keys, in another order: docs/performance.md,
    "Whole model under CUDA graphs"), the same greedy tokens."""
    torch.testing.assert_close(static(ids[:, :prompt], pad=pad), eager(ids[:, :prompt], pad=pad),
                               rtol=0, atol=0)
    for t in range(prompt, ids.shape[1]):
        expect, got = eager(ids[:, t:t + 1]), static(ids[:, t:t + 1])
        assert got.shape == expect.shape == (ids.shape[0], 1, expect.shape[-1])
        assert torch.equal(static.keys[0, :, :, :t + 1], eager.keys[0, :, :, :t + 1])
        assert torch.equal(static.values[0, :, :, :t + 1], eager.values[0, :, :, :t + 1])
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), expect.argmax(-1))


@pytest.mark.parametrize("batch, pad", [(1, None), (3, [0, 2, 5])])
def test_static_decode_step_matches_eager(gqa_model, monkeypatch, batch, pad):
    """Grouped-query heads (8 heads, 2 kv heads), a batch with left padding, steps across
    three key spans (MIN_SPAN lowered to 8: spans 8, 16 and max_len = 20); then reset() and a
    new batch without padding, whose steps take the same spans again."""
    monkeypatch.setattr(spikeops.runner, "MIN_SPAN", 8)
    ids = torch.randint(0, 97, (batch, 20))
    pad = None if pad is None else torch.tensor(pad)
    eager = Runner(gqa_model, 20, batch=batch, head_dtype=None)
    static = static_runner(gqa_model, 20, batch)
    assert_static_steps_match(eager, static, ids, 6, pad)
    eager.reset()
    static.reset()
    assert_static_steps_match(eager, static, ids.flip(1), 3)


def test_static_decode_step_bfloat16_head_and_one_token_prompt(gqa_model):
    """A one-token prompt takes the static step too; head_dtype runs in it."""
    ids = torch.randint(0, 97, (2, 5))
    eager = Runner(gqa_model, 5, batch=2, head_dtype=torch.bfloat16)
    static = Runner(gqa_model, 5, batch=2, head_dtype=torch.bfloat16)
    static._static = True
    for t in range(5):
        torch.testing.assert_close(static(ids[:, t:t + 1]), eager(ids[:, t:t + 1]),
                                   rtol=1e-5, atol=1e-5)


def test_static_decode_step_under_tracking_runs_eagerly(model, monkeypatch):
    """spikeops.track observes through Python hooks, which a graph replay skips: while it is
    active on the Runner's model, steps take the eager path (and are counted); otherwise, also
    while another model is tracked, the static one."""
    calls = []
    step = Runner._static_step
    monkeypatch.setattr(Runner, "_static_step",
                        lambda self, *a: calls.append(1) or step(self, *a))
    runner = static_runner(model, 8)
    runner(torch.randint(0, 256, (1, 4)))
    with spikeops.track(model) as tracker:
        runner(torch.randint(0, 256, (1, 1)))
    assert not calls and tracker.whole_model()["dense_macs"]["lm_head"] > 0
    with spikeops.track(copy.deepcopy(model)):
        runner(torch.randint(0, 256, (1, 1)))
    assert len(calls) == 1


class HostReads(TorchDispatchMode):
    """Records the ops run under it that read a tensor's values on the host (on CUDA: a
    synchronization, which a graph capture refuses)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal",
             "aten.is_nonzero", "aten.unique")

    def __init__(self):
        super().__init__()
        self.ops, self.reads = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.add(name)
        if name.startswith(self.READS):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spiking", [False, True])
def test_static_decode_step_reads_nothing_back(gqa_model, model, spiking):
    """What a CUDA graph can hold, checked on the CPU: the static step (SpikeLinear projections
    and their shared encodings included) runs no op that reads a tensor value on the host."""
    net = model if spiking else gqa_model
    runner = static_runner(net, 16, 2)
    runner(torch.randint(0, 97, (2, 5)), pad=torch.tensor([0, 2]))
    with HostReads() as watch:
        runner(torch.randint(0, 97, (2, 1)))
    assert "aten.index_copy_.default" in watch.ops and not watch.reads
    assert any(op.startswith("spikeops.spike_linear") for op in watch.ops) == spiking


def test_cuda_graphs_rejects(gqa_model):
    with pytest.raises(TypeError, match="cuda_graphs"):
        Runner(gqa_model, 8, cuda_graphs=1)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        Runner(gqa_model, 8, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the float key-value cache"):
        Runner(gqa_model, 8, kv="spike4", cuda_graphs=True)
    dynamic = copy.deepcopy(gqa_model)  # what transformers sets for rope_type "dynamic"
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="cuda_graphs=True needs a rotary embedding"):
        Runner(dynamic, 8, cuda_graphs=True)
    # The default takes graphs where they apply only: none of these.
    for runner in (Runner(gqa_model, 8), Runner(gqa_model, 8, kv="spike4"),
                   Runner(dynamic, 8), Runner(gqa_model, 8, cuda_graphs=False)):
        assert not runner._static and not runner.cuda_graphs


cuda_only = pytest.mark.skipif(not cuda_ready(), reason=CUDA_REASON)


@cuda_only
@pytest.mark.parametrize("spiking", [False, True])
def test_cuda_graph_decode_equals_static_eager(gqa_model, model, monkeypatch, spiking):
    """On the GPU: the captured step, replayed over several steps, across two key spans, and
    again after reset() (the same graphs, a new batch without padding), gives the logits of the
    static step run eagerly bit for bit; a float16 float model and the spiking GPTQ model
    (SpikeLinear on CUDA, whose ops read nothing back to the host during capture)."""
    monkeypatch.setattr(spikeops.runner, "MIN_SPAN", 8)
    net = (model if spiking else copy.deepcopy(gqa_model).half()).cuda()
    ids = torch.randint(0, net.config.vocab_size, (2, 14), device="cuda")
    graphs, plain = Runner(net, 14, batch=2), static_runner(net, 14, 2)
    assert graphs.cuda_graphs and graphs._graphs == {}
    plain._graphs = None  # the static step run eagerly on the GPU
    for pad in (torch.tensor([0, 3]), None):
        assert torch.equal(graphs(ids[:, :5], pad=pad), plain(ids[:, :5], pad=pad))
        for t in range(5, 14):
            assert torch.equal(graphs(ids[:, t:t + 1]), plain(ids[:, t:t + 1])), t
        assert sorted(graphs._graphs) == [8, 14]
        graphs.reset()
        plain.reset()


@cuda_only
def test_cuda_graph_decode_matches_eager_decode(gqa_model):
    """On the GPU, float16: graph steps against the eager decode (cuda_graphs=False) to float16
    rounding; the logits returned are copies, not the graph's buffer."""
    net = copy.deepcopy(gqa_model).half().cuda()
    ids = torch.randint(0, net.config.vocab_size, (3, 12), device="cuda")
    graphs, eager = Runner(net, 12, batch=3, cuda_graphs=True), \
        Runner(net, 12, batch=3, cuda_graphs=False)
    graphs(ids[:, :4]), eager(ids[:, :4])
    steps = []
    for t in range(4, 12):
        got, expect = graphs(ids[:, t:t + 1]), eager(ids[:, t:t + 1])
        torch.testing.assert_close(got, expect, rtol=1e-2, atol=1e-2)
        steps.append((got.clone(), got))
    assert all(torch.equal(kept, got) for kept, got in steps)
