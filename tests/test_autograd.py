"""Gradients (docs/ops.md, "Gradients"): the exact forward is unchanged, the backward is the
straight-through estimator of the float fake-quant formula, written here again from
docs/ops.md, with torch ops: ``round`` (``floor`` for oat) straight through, ``torch.clamp``,
the per-token statistics constants."""

import pytest
import torch

import spikeops
from spikeops import Encoding, SpikeLinear
from spikeops.autograd import freeze, learn_clipping, make_trainable

from helpers import make_layer

K, N = 72, 24


# ----------------------------------------------------------------------------- the formula
def _ste(v):
    return v + (torch.round(v) - v).detach()


def _ste_floor(v):
    return v + (torch.floor(v) - v).detach()


def _ste_quant(u, lo, hi, site, floor=False):
    return torch.clamp(_ste_floor(u) if floor else _ste(u), lo, hi)


def formula(x, enc, mask=None, gamma=None, theta=None, scale=None, zero=None, stats=None,
            quant=_ste_quant):
    """docs/ops.md's ``x_hat`` of ``x [M, K]`` in x's dtype. gamma / theta / scale: tensors
    (or None: the Encoding's). stats: the rows the per-token statistics are taken from (default
    x, detached). quant(u, lo, hi, site, floor): the rounding and clamp of the codes."""
    dt = x.dtype
    xs = (x if stats is None else stats).detach()
    sgn = torch.where(xs < 0, -1.0, 1.0).to(dt)
    if enc.mode == "oat":
        P = enc.bits
        th = theta if theta is not None else torch.tensor(enc.theta, dtype=dt)
        tn, to = th[0], th[1]
        a = torch.clamp(x, -to, to) * sgn  # |.|, straight through also at x = 0
        r = torch.clamp(xs, -to.detach(), to.detach()).abs() >= tn.detach()  # range: discrete
        t = torch.where(r, to, tn)
        Q = quant(a / t * 2.0 ** P, 0.0, 2.0 ** P - 1, "oat", floor=True)
        return sgn * (t / 2.0 ** P) * Q
    g = gamma if gamma is not None else torch.tensor(enc.gamma or 1.0, dtype=dt)
    widths = [enc.bits] + ([enc.salient_bits] if mask is not None else [])
    outs = []
    for i, b in enumerate(widths):
        if enc.mode == "minmax" or (enc.mode == "static" and zero is not None):
            qmax = 2.0 ** b - 1
            if enc.mode == "minmax":
                mn, mx = xs.min(1, keepdim=True).values, xs.max(1, keepdim=True).values
                s = torch.clamp((mx - mn) / qmax, 1e-5, 1e4)
                z = torch.round(torch.clamp(-mn / s, -1e4, 1e4))
            else:
                s, z = scale.reshape(-1, 1), zero.to(dt).reshape(-1, 1)
            Q = quant(x / s + z, 0.0, qmax, i)  # round(x / s) + z: z is an integer
            outs.append(s * (Q - z))
        else:
            qmax = 2.0 ** (b - 1) - 1
            if enc.mode == "absmax":
                s = torch.clamp(g * xs.abs().amax(1, keepdim=True) / qmax, 1e-5, 1e4)
            elif enc.mode == "absmean":
                mean = xs.abs().double().mean(1, keepdim=True).float().to(dt)
                s = torch.clamp(g * mean, 1e-5, 1e4)
            else:
                s = scale.reshape(-1, 1)
            # min(round(|x| / s), qmax) with the sign: clamp(round(x / s), -qmax, qmax), as
            # round-half-to-even is odd; straight through also at x = 0.
            outs.append(s * quant(x / s, -qmax, qmax, i))
    return torch.where(mask, outs[1], outs[0]) if mask is not None else outs[0]


def frozen_formula(x0, enc, **kw):
    """The formula linearized at x0 and the given parameters: the rounding residual
    ``round(u0) - u0``, which elements are clipped and the statistics are constants. Smooth
    around the base point, with the STE's derivative there: what gradcheck differentiates."""
    base = {}

    def record(u, lo, hi, site, floor=False):
        base[site] = (u.detach(), floor)
        return _ste_quant(u, lo, hi, site, floor)

    formula(x0, enc, quant=record, **kw)

    def frozen(u, lo, hi, site, floor=False):
        u0, fl = base[site]
        q0 = torch.floor(u0) if fl else torch.round(u0)
        inside = (q0 >= lo) & (q0 <= hi)
        return torch.where(inside, u + (q0 - u0), torch.clamp(q0, lo, hi))

    def fn(x, **params):
        return formula(x, enc, stats=x0, quant=frozen, **{**kw, **params})
    return fn


# ----------------------------------------------------------------------------- cases
def salient_mask(k=K):
    return torch.arange(k) % 7 == 3


CASES = {  # name: (Encoding, mask, trainable parameter: (name, value) or None)
    "minmax4": (Encoding("minmax", 4), None, None),
    "absmax4": (Encoding("absmax", 4), None, ("gamma", 0.8)),
    "absmean4": (Encoding("absmean", 4), None, ("gamma", 0.6)),
    "oat4": (Encoding("oat", 4, theta=(0.8, 2.5)), None, ("theta", (0.8, 2.5))),
    "salient-absmax": (Encoding("absmax", 4, salient_bits=6), salient_mask(), ("gamma", 0.7)),
    "salient-minmax": (Encoding("minmax", 3, salient_bits=6), salient_mask(), None),
    "static-signed": (Encoding("static", 4), None, ("scale", None)),
    "static-unsigned": (Encoding("static", 4), None, ("scale", None)),
}


def case_inputs(name, M=3, dtype=torch.float64, requires_grad=True):
    """x (float32 values, in ``dtype``), the Encoding, mask and the parameter kwargs."""
    enc, mask, param = CASES[name]
    x = (torch.randn(M, K) * 1.5).to(dtype)
    x[0, 5] = 0.0  # an exact zero: straight through as well
    kw = {"mask": mask}
    if name.startswith("static"):
        kw["scale"] = torch.rand(M, dtype=torch.float32).to(dtype) * 0.3 + 0.2
        if name == "static-unsigned":
            kw["zero"] = torch.tensor([8, 6, 9], dtype=torch.int32)[:M]
    elif param is not None:
        kw[param[0]] = torch.tensor(param[1], dtype=torch.float32).to(dtype)
    for k in ("gamma", "theta", "scale"):
        if k in kw:
            kw[k].requires_grad_(requires_grad)
    return x.requires_grad_(requires_grad), enc, kw


def fq(x, enc, kw):
    """spikeops.fake_quantize with the kwargs of case_inputs."""
    return spikeops.fake_quantize(x, enc, kw.get("mask"), scale=kw.get("scale"),
                                  zero=kw.get("zero"), gamma=kw.get("gamma"),
                                  theta=kw.get("theta"))


def params_of(kw):
    return [kw[k] for k in ("gamma", "theta", "scale") if k in kw]


# ----------------------------------------------------------------------------- fake_quantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_fake_quantize_forward_is_encode_decode(name, dtype):
    """Bit for bit ``encode(x).decode(x.dtype)``, with and without grad, for every encoding."""
    x, enc, kw = case_inputs(name, M=5 if not name.startswith("static") else 3, dtype=dtype)
    enc_used = enc
    if "gamma" in kw:
        enc_used = Encoding(enc.mode, enc.bits, gamma=kw["gamma"].item(),
                            salient_bits=enc.salient_bits)
    if "theta" in kw:
        enc_used = Encoding("oat", enc.bits, theta=tuple(kw["theta"].tolist()))
    scale = kw.get("scale")
    want = spikeops.encode(x.detach(), enc_used, kw.get("mask"),
                           scale=None if scale is None else scale.detach().float(),
                           zero=kw.get("zero")).decode(dtype)
    y = fq(x, enc, kw)
    assert y.dtype == dtype and y.requires_grad
    assert torch.equal(y.detach(), want)
    with torch.no_grad():
        assert torch.equal(fq(x, enc, kw), want)
    # the test formula is docs/ops.md's: the same values (up to float rounding)
    want32 = spikeops.encode(x.detach(), enc_used, kw.get("mask"),
                             scale=None if scale is None else scale.detach().float(),
                             zero=kw.get("zero")).decode(torch.float32)
    ref = formula(x.detach().float(), enc, **{k: (v.detach().float() if torch.is_tensor(v)
                                                  and v.is_floating_point() else v)
                                              for k, v in kw.items()})
    torch.testing.assert_close(ref, want32, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(CASES))
def test_backward_is_autograd_of_the_ste_formula(name):
    """Gradients for x and every parameter equal autograd on the formula with straight-through
    rounding (float32, 64 tokens)."""
    x, enc, kw = case_inputs(name, M=3 if name.startswith("static") else 64,
                             dtype=torch.float32)
    g = torch.randn(x.shape)
    inputs = [x] + params_of(kw)
    got = torch.autograd.grad(fq(x, enc, kw), inputs, g)
    want = torch.autograd.grad(formula(x, enc, **kw), inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_against_the_float_formula(name):
    """torch.autograd.gradcheck in float64: the analytic gradient is spikeops.fake_quantize's
    backward at the point, the numerical one the float formula's (rounding residuals, clipped
    set and statistics held at the point: round with zero derivative)."""
    x0, enc, kw = case_inputs(name, M=3, requires_grad=False)
    pname = next((k for k in ("gamma", "theta", "scale") if k in kw), None)
    fixed = {k: v for k, v in kw.items() if k != pname}
    p0 = kw[pname] if pname else torch.zeros(())
    surrogate = frozen_formula(x0, enc, **kw)

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            ctx.save_for_backward(x, p)
            return surrogate(x, **({pname: p} if pname else {}))

        @staticmethod
        def backward(ctx, g):
            x, p = ctx.saved_tensors
            with torch.enable_grad():
                xx, pp = x.detach().requires_grad_(), p.detach().requires_grad_()
                y = fq(xx, enc, {**fixed, **({pname: pp} if pname else {})})
                gx, gp = torch.autograd.grad(y, (xx, pp), g, allow_unused=True)
            return gx, (gp if gp is not None else torch.zeros_like(p))

    x = x0.clone().requires_grad_()
    p = p0.clone().requires_grad_(pname is not None)
    assert torch.autograd.gradcheck(Checked.apply, (x, p), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_clipped_elements_get_no_gradient_and_gamma_gets_lsq():
    """absmax by hand: the x-gradient is 1 where round(|x| / s) <= qmax, else 0 (clipped);
    d x_hat / d gamma = (Q - x / s * inside) * max|x| / qmax (LSQ)."""
    enc = Encoding("absmax", 3)                 # qmax 3
    x = torch.tensor([[4.0, -3.0, 1.0, 0.4, -0.2, 2.9]], requires_grad=True)
    gamma = torch.tensor(0.5, requires_grad=True)
    # s = 0.5 * 4 / 3; x / s = 6, -4.5, 1.5, 0.6, -0.3, 4.35; rounded 6, -4, 2, 1, 0, 4
    gx, gg = torch.autograd.grad(spikeops.fake_quantize(x, enc, gamma=gamma).sum(), (x, gamma))
    assert gx.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]
    # Q - x/s inside: 0.5, 0.4, 0.3; clipped: Q = 3, -3, 3; times max|x| / qmax = 4 / 3
    assert float(gg) == pytest.approx((3 - 3 + 0.5 + 0.4 + 0.3 + 3) * 4 / 3, rel=1e-6)
    # gamma = 1: the largest element sits on the bound, x / s = qmax, and is not clipped
    x = torch.tensor([[3.0, -1.0, 0.5]], requires_grad=True)
    gamma = torch.tensor(1.0, requires_grad=True)
    gx, gg = torch.autograd.grad(spikeops.fake_quantize(x, enc, gamma=gamma).sum(), (x, gamma))
    assert gx.tolist() == [[1.0, 1.0, 1.0]]
    assert float(gg) == pytest.approx(-0.5)     # round(0.5) = 0 (half to even): 0 - 0.5


def test_nonfinite_rows_pass_no_gradient():
    x = torch.randn(3, K)
    x[1, 4] = float("nan")
    x.requires_grad_()
    gamma = torch.tensor(0.9, requires_grad=True)
    y = spikeops.fake_quantize(x, Encoding("absmax", 4), gamma=gamma)
    assert torch.isnan(y[1]).all()
    gx, gg = torch.autograd.grad(y[[0, 2]].sum(), (x, gamma))
    assert torch.equal(gx[1], torch.zeros(K)) and bool(torch.isfinite(gg))


def test_fake_quantize_refusals():
    x = torch.randn(2, K, requires_grad=True)
    with pytest.raises(ValueError, match="gamma must be in"):
        spikeops.fake_quantize(x, Encoding("absmax", 4), gamma=torch.tensor(1.5))
    with pytest.raises(ValueError, match="trainable gamma needs mode"):
        spikeops.fake_quantize(x, Encoding("minmax", 4), gamma=torch.tensor(0.5))
    with pytest.raises(ValueError, match="theta must satisfy"):
        spikeops.fake_quantize(x, Encoding("oat", 4, theta=(1.0, 2.0)),
                               theta=torch.tensor([2.0, 1.0]))
    with pytest.raises(TypeError, match="float tensor"):
        spikeops.fake_quantize(torch.ones(2, K, dtype=torch.int32), Encoding("minmax", 4))


# ----------------------------------------------------------------------------- no gradient
def test_encode_decode_backward_raises_a_clear_error():
    x = torch.randn(4, K, requires_grad=True)
    st = spikeops.encode(x, Encoding("absmax", 4))
    with pytest.raises(RuntimeError, match=r"SpikeTensor.decode \(op spike_decode\) has no "
                                           r"gradient.*spikeops.fake_quantize\(x, enc\)"):
        st.decode().sum().backward()
    with pytest.raises(RuntimeError, match=r"spikeops.encode \(op gif_encode\) has no gradient"
                                           r".*fake_quantize"):
        st.scale.sum().backward()
    assert x.grad is None
    # no grad mode, or no input requiring grad: nothing attached
    with torch.no_grad():
        assert not spikeops.encode(x, Encoding("absmax", 4)).scale.requires_grad
    assert not spikeops.encode(x.detach(), Encoding("absmax", 4)).scale.requires_grad


def test_spike_linear_on_spikes_backward_raises():
    w, *_ = make_layer(K, N, 4, 24)
    x = torch.randn(4, K, requires_grad=True)
    y = spikeops.spike_linear(spikeops.encode(x, Encoding("minmax", 4)), w)
    with pytest.raises(RuntimeError, match="SpikeLinear module on x"):
        y.float().sum().backward()


def test_weight_buffers_have_no_gradient():
    w, *_ = make_layer(K, N, 4, 24)
    lin = SpikeLinear(w, Encoding("absmax", 4))
    lin.gptq.scales.requires_grad_(True)
    with pytest.raises(ValueError, match="GPTQ weights .* have no gradient"):
        lin(torch.randn(2, K, requires_grad=True))
    with pytest.raises(RuntimeError, match="gptq_dequantize has no gradient"):
        lin.dequantize().float().sum().backward()


# ----------------------------------------------------------------------------- SpikeLinear
LAYER_ENCODINGS = {
    "minmax4": (Encoding("minmax", 4), False),
    "absmax4": (Encoding("absmax", 4, gamma=0.7), False),
    "absmean4": (Encoding("absmean", 4, gamma=0.8), False),
    "oat8": (Encoding("oat", 8, theta=(1.0, 3.0)), False),
    "salient": (Encoding("minmax", 4, salient_bits=7), True),
}


def spike_layer(name, bias=True):
    enc, salient = LAYER_ENCODINGS[name]
    w, *_ = make_layer(K, N, 4, 24, sym=False)
    b = torch.randn(N).half() if bias else None
    return SpikeLinear(w, enc, bias=b, salient_mask=salient_mask() if salient else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(LAYER_ENCODINGS))
def test_spike_linear_grad_x_is_grad_y_at_w_hat_through_the_ste(name, dtype):
    lin = spike_layer(name)
    x = (torch.randn(2, 3, K) * 2).to(dtype).requires_grad_()
    with torch.no_grad():
        before = lin(x)
    y = lin(x)
    assert torch.equal(y.detach(), before) and y.dtype == dtype  # the exact forward
    with torch.inference_mode():
        assert torch.equal(lin(x.detach()), before)
    gy = torch.randn(y.shape).to(dtype)
    y.backward(gy)
    assert x.grad is not None and x.grad.dtype == dtype
    w_hat = lin.dequantize().float()                       # [N, K], exact
    g_hat = gy.float().reshape(-1, N) @ w_hat
    rows = x.detach().float().reshape(-1, K).requires_grad_()
    enc, salient = LAYER_ENCODINGS[name]
    (slope,) = torch.autograd.grad(formula(rows, enc, mask=salient_mask() if salient else None),
                                   rows, torch.ones_like(rows))
    torch.testing.assert_close(slope, (slope > 0.5).float())  # the STE: 1 inside, 0 clipped
    want = torch.where(slope > 0.5, g_hat, 0.0).to(dtype).float()
    got = x.grad.float().reshape(-1, K)
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["absmax4", "absmean4", "oat8"])
def test_clip_gradient_against_finite_differences(name):
    """d loss / d gamma (theta) of a layer with a trainable clipping parameter against central
    differences of the float formula (rounding and statistics held), in float64."""
    lin = spike_layer(name, bias=False)
    (p,) = make_trainable(lin)
    x = torch.randn(16, K) * 2
    gy = torch.randn(16, N)
    (lin(x) * gy).sum().backward()
    enc = lin.enc
    w = lin.dequantize().double()
    key = "theta" if enc.mode == "oat" else "gamma"
    x64 = x.double()
    p64 = p.detach().double()
    surrogate = frozen_formula(x64, enc, **{key: p64})

    def loss(value):
        return float(((surrogate(x64, **{key: value}) @ w.t()) * gy.double()).sum())

    h = 1e-6
    for i in range(p.numel()):
        e = torch.zeros_like(p64).reshape(-1)
        e[i] = h
        e = e.reshape(p64.shape)
        fd = (loss(p64 + e) - loss(p64 - e)) / (2 * h)
        got = float(p.grad.reshape(-1)[i])
        assert abs(got - fd) <= 1e-3 * max(1.0, abs(fd)), (i, got, fd)


def test_trainable_clip_forward_is_exact_and_freeze_keeps_it():
    lin = spike_layer("absmax4")
    x = torch.randn(5, K)
    with torch.no_grad():
        before = lin(x)
    (p,) = make_trainable(lin)
    assert isinstance(p, torch.nn.Parameter) and p.item() == pytest.approx(0.7)
    assert "clip" in dict(lin.named_parameters())
    assert torch.equal(lin(x).detach(), before)
    with torch.no_grad():
        p.fill_(0.55)
        with_param = lin(x)
    assert not torch.equal(with_param, before)  # the parameter's value is used
    values = freeze(lin)
    assert values == {"": pytest.approx(0.55)} and lin.enc.gamma == pytest.approx(0.55)
    assert not list(lin.parameters())
    with torch.no_grad():
        assert torch.equal(lin(x), with_param)
    compiled = torch.compile(lin, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), with_param)
    torch._dynamo.reset()


def test_trainable_bias_gets_the_sum_of_grad_y():
    lin = spike_layer("absmax4")
    x = torch.randn(3, 4, K, requires_grad=True)
    with torch.no_grad():
        before = lin(x)
    make_trainable(lin, clip=False, bias=True)
    y = lin(x)
    assert torch.equal(y.detach(), before)
    gy = torch.randn(y.shape)
    y.backward(gy)
    torch.testing.assert_close(lin.bias.grad.float(), gy.reshape(-1, N).sum(0),
                               rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        lin.bias.add_(1.0)
        moved = lin(x)
    freeze(lin)
    assert "bias" in dict(lin.named_buffers())
    with torch.no_grad():
        assert torch.equal(lin(x), moved)


def test_make_trainable_refusals():
    with pytest.raises(ValueError, match="no clipping parameter"):
        make_trainable(spike_layer("minmax4"))
    lin = spike_layer("absmax4")
    (p,) = make_trainable(lin)
    with torch.no_grad():
        p.fill_(1.5)
    with pytest.raises(ValueError, match="gamma must be in"):
        lin(torch.randn(1, K))


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("objective", ["distill", "loss", "layer"])
def test_learn_clipping_on_a_tiny_model(model, objective):
    from helpers import tiny_batches
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SpikeLinear)}
    for m in layers.values():
        m.set_encoding(Encoding("absmax", 4, gamma=0.9))
    ids = tiny_batches()[0]
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    gammas = learn_clipping(model, tiny_batches(), steps=2, lr=0.05, objective=objective,
                            progress=False)
    assert set(gammas) == set(layers)
    assert all(0.05 <= g <= 1.0 for g in gammas.values())
    assert any(g != pytest.approx(0.9) for g in gammas.values())
    for n, m in layers.items():
        assert m.enc.gamma == gammas[n] and not m._parameters
    assert all(p.requires_grad for p in model.parameters())  # restored
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert after.shape == before.shape and bool(torch.isfinite(after).all())


def test_model_backward_reaches_the_embeddings(model):
    """Distillation / QAT: a loss through every SpikeLinear of a model gives gradients to the
    float parameters below them."""
    from helpers import tiny_batches
    ids = tiny_batches()[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = model(input_ids=ids).logits
    assert torch.equal(out.detach(), want)
    out.float().pow(2).mean().backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and bool(emb.grad.abs().sum() > 0)


@pytest.mark.parametrize("name", ["absmax4", "oat8", "salient"])
def test_devices_agree(device, name):
    """The backward on ``device`` (CUDA where present) gives the CPU's gradients."""
    grads = []
    for dev in ("cpu", device):
        torch.manual_seed(1)
        lin = spike_layer(name).to(dev)
        params = make_trainable(lin) if name != "salient" else []
        x = (torch.randn(4, K) * 2).to(dev).requires_grad_()
        lin(x).pow(2).sum().backward()
        grads.append([x.grad.cpu()] + [p.grad.cpu() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
