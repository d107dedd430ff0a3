"""feedback_encode (docs/ops.md): against reference.py bit for bit, against gif_encode's minmax
where no error is carried, and against an independent float64 measure of what it is for: the
error of a product with queries of known second moment, which the carried errors shrink."""

import pytest
import torch

from spikeops import ops, reference
from spikeops.attention import key_feedback

from helpers import CUDA_REASON, cuda_ready


def carried(G, K, scale=1.0):
    """A random strictly upper feedback matrix per group."""
    return (torch.randn(G, K, K) * scale / K ** 0.5).triu(1)


def assert_same(a, b):
    for name, u, v in zip(("planes", "scale", "zero"), a, b):
        u, v = u.cpu(), v.cpu()
        assert u.shape == v.shape and u.dtype == v.dtype, name
        assert torch.equal(torch.nan_to_num(u.float()) if u.is_floating_point() else u,
                           torch.nan_to_num(v.float()) if v.is_floating_point() else v), name
        if u.is_floating_point():
            assert torch.equal(u.isnan(), v.isnan()), name


@pytest.mark.parametrize("G,N,K", [(1, 1, 1), (3, 7, 64), (2, 5, 70), (1, 4, 33), (2, 3, 128),
                                   (1, 2, 1024)])
@pytest.mark.parametrize("bits,gamma", [(1, 1.0), (4, 0.9), (8, 1.0), (16, 0.5)])
def test_matches_the_reference(G, N, K, bits, gamma):
    x = torch.randn(G, N, K) * 3
    F = carried(G, K)
    assert_same(ops.feedback_encode(x, F, bits, gamma), reference.feedback_encode(x, F, bits, gamma))


def test_no_feedback_is_gif_encode_minmax():
    """Zero feedback (and whatever lies on or below the diagonal: never read) gives
    gif_encode's minmax fields, NaN and Inf rows included."""
    G, N, K = 3, 6, 100
    x = torch.randn(G, N, K)
    x[0, 2, 7] = float("nan")
    x[2, 5, 0] = float("inf")
    lower = torch.randn(G, K, K).tril()
    got = ops.feedback_encode(x, lower, 4, 0.9)
    planes, _, _, scale, zero = ops.gif_encode(x.reshape(-1, K), "minmax", 4, 0.9)
    assert_same(got, (planes, scale, zero))
    assert got[1][2].isnan() and got[1][17].isnan() and (got[0][:, [2, 17]] == 0).all()
    # A non-finite row stays silent with feedback too, and the other rows are the reference's.
    F = carried(G, K)
    assert_same(ops.feedback_encode(x, F, 4, 0.9), reference.feedback_encode(x, F, 4, 0.9))


def test_carried_errors_shrink_the_product_error():
    """Independent float64 check of the purpose: keys coded with key_feedback's matrix for a
    query moment M (strongly anisotropic, as real queries are) have a smaller expected squared
    error of q . (x_hat - x) over queries of moment M than keys rounded alone (at least 1.5x;
    4.9x on these rows), though their own squared error is larger (2.4x): the error is moved
    to where the queries do not look."""
    torch.manual_seed(1)
    D, T = 64, 2000
    A = torch.randn(D, D, dtype=torch.float64) * torch.logspace(0, -2, D, dtype=torch.float64)
    M = (A @ A.T).unsqueeze(0)                                  # [1, D, D]
    x = torch.randn(1, T, D)
    F = key_feedback(M.float(), torch.ones(1, 1, 1, D), None)   # [1, D, D]
    errors, plain = {}, {}
    for name, feedback in (("rounded", torch.zeros_like(F)), ("carried", F)):
        planes, scale, zero = ops.feedback_encode(x, feedback, 4, 1.0)
        x_hat = ops.spike_decode(planes, None, None, scale, zero, D, torch.float32).double()
        d = x_hat - x[0].double()
        errors[name] = float(torch.einsum("ti,ij,tj->t", d, M[0], d).mean())
        plain[name] = float((d * d).sum(-1).mean())
    assert errors["carried"] * 1.5 < errors["rounded"], errors
    assert plain["carried"] > plain["rounded"], plain


def test_key_feedback_of_an_isotropic_moment_carries_nothing():
    """M = I with no rotation and unit scales: H is a multiple of I, U diagonal, so the
    feedback's strict upper triangle is zero and the codes are gif_encode's."""
    D = 32
    F = key_feedback(torch.eye(D).expand(2, D, D), torch.ones(1, 2, 1, D), None)
    assert F.shape == (2, D, D) and torch.equal(F.triu(1), torch.zeros(2, D, D))
    # A zero moment (no query ever read the layer) also carries nothing, without failing.
    F = key_feedback(torch.zeros(1, D, D), torch.ones(3, 1, 1, D), None)
    assert F.shape == (3, D, D) and torch.equal(F.triu(1), torch.zeros(3, D, D))


def test_bad_arguments_are_refused():
    x, F = torch.randn(2, 3, 40), carried(2, 40)
    cases = [
        (lambda: ops.feedback_encode(x.double(), F, 4, 1.0), TypeError, "x must be"),
        (lambda: ops.feedback_encode(x[0], F, 4, 1.0), ValueError, "x must have shape"),
        (lambda: ops.feedback_encode(torch.randn(1, 2, 1025), carried(1, 1025), 4, 1.0),
         ValueError, "1 <= K <= 1024"),
        (lambda: ops.feedback_encode(x, F[:1], 4, 1.0), ValueError, "feedback must have shape"),
        (lambda: ops.feedback_encode(x, F.half(), 4, 1.0), TypeError, "feedback must be"),
        (lambda: ops.feedback_encode(x, F, 0, 1.0), ValueError, "bits must be in"),
        (lambda: ops.feedback_encode(x, F, 17, 1.0), ValueError, "bits must be in"),
        (lambda: ops.feedback_encode(x, F, 4, 0.0), ValueError, "gamma must be in"),
        (lambda: ops.feedback_encode(x, F, 4, float("nan")), ValueError, "gamma must be in"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.skipif(not cuda_ready(), reason=CUDA_REASON)
@pytest.mark.parametrize("K", [1, 33, 64, 1024])
def test_cuda_matches_the_cpu(K):
    G, N = 3, 50
    x = torch.randn(G, N, K) * 2
    x[1, 4, 0] = float("nan")
    F = carried(G, K)
    for bits, gamma in ((4, 0.9), (8, 1.0), (16, 0.5)):
        assert_same(ops.feedback_encode(x.cuda(), F.cuda(), bits, gamma),
                    ops.feedback_encode(x, F, bits, gamma))
