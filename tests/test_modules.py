"""DAGFM / DAGFM+ modules and the teachers."""
import math

import pytest
import torch
from torch import nn

from dagfm_ext import reference
from dagfm_ext.modules import DAGFM, DAGFMPlus
from dagfm_ext.teachers import CIN, FM, CrossNet, build_teacher, register_teacher, teacher_names, TEACHERS

F, D, L, B = 5, 4, 3, 6


# -- a faithful restatement of the public KD-DAGFM student (official repo / RecBole DAGFM) ----
class PublicDAGFM(nn.Module):
    """Parameters p.{t}, q.{t} (ParameterLists of (F, F, D)), connect_layer (F, F), linear over
    cat(states, -1); the forward written as the public code writes it."""

    def __init__(self, field_num, embedding_size, depth, type_):
        super().__init__()
        self.type, self.depth = type_, depth
        self.p = nn.ParameterList([nn.Parameter(torch.randn(field_num, field_num, embedding_size)) for _ in range(depth)])
        if type_ == "outer":
            self.q = nn.ParameterList([nn.Parameter(torch.randn(field_num, field_num, embedding_size)) for _ in range(depth)])
        self.register_buffer("adj_matrix", torch.ones(field_num, field_num).triu()[:, :, None].expand(-1, -1, embedding_size).clone())
        self.connect_layer = nn.Parameter(torch.eye(field_num) + 0.3 * torch.randn(field_num, field_num))
        self.linear = nn.Linear(field_num * (depth + 1), 1)

    def forward(self, feature):
        init_state = self.connect_layer @ feature
        h0, ht = init_state, init_state
        state = [torch.sum(init_state, dim=-1)]
        for i in range(self.depth):
            if self.type == "inner":
                ht = h0 * torch.einsum("bfd,fsd->bsd", ht, self.p[i] * self.adj_matrix)
            else:
                term = torch.einsum("bfd,fsd->bfs", ht, self.p[i] * self.adj_matrix)
                ht = h0 * torch.einsum("bfs,fsd->bsd", term, self.q[i])
            state.append(torch.sum(ht, -1))
        return self.linear(torch.cat(state, dim=-1))  # logits (B, 1)


class Wrapper(nn.Module):  # how KD_DAGFM checkpoints nest the student
    def __init__(self, student):
        super().__init__()
        self.student_network = student
        self.teacher_network = nn.Linear(2, 2)


@pytest.mark.parametrize("interaction", ["inner", "outer"])
@pytest.mark.parametrize("nested", [False, True])
def test_load_official_state_dict_reproduces_public_logits(interaction, nested):
    torch.manual_seed(0)
    public = PublicDAGFM(F, D, L, interaction)
    with torch.no_grad():  # keep values O(1) so 1e-5 is a meaningful tolerance
        for p in public.parameters():
            p.mul_(0.5)
    sd = (Wrapper(public) if nested else public).state_dict()
    model = DAGFM(F, D, L, interaction)
    if nested:
        model.load_official_state_dict({k: v for k, v in sd.items() if k.startswith("student_network.")})
        other = DAGFM(F, D, L, interaction)
        other.load_official_state_dict(sd, prefix="student_network.", strict=False)
        assert torch.equal(other.p, model.p)
    else:
        model.load_official_state_dict(sd)
    x = torch.randn(B, F, D)
    torch.testing.assert_close(model(x), public(x).squeeze(-1), atol=1e-5, rtol=1e-5)


def test_load_official_state_dict_errors():
    sd = PublicDAGFM(F, D, L, "outer").state_dict()
    with pytest.raises(KeyError, match="q.0"):
        DAGFM(F, D, L, "outer").load_official_state_dict({k: v for k, v in sd.items() if k != "q.0"})
    with pytest.raises(ValueError, match="p.0.*expected shape"):
        DAGFM(F + 1, D, L, "outer").load_official_state_dict(sd)
    with pytest.raises(ValueError, match="beyond depth"):
        DAGFM(F, D, L - 1, "outer").load_official_state_dict(sd)
    with pytest.raises(ValueError, match="unexpected keys"):
        DAGFM(F, D, L, "inner").load_official_state_dict(sd)  # q.* has no place in 'inner'
    for module in (DAGFM(F, D, L, "outer"), DAGFMPlus(F, D, L, "outer")):
        with pytest.raises(TypeError, match="sd: expected a state dict .* got list"):
            module.load_official_state_dict(list(sd.values()))


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
def test_dagfm_matches_reference_composition(interaction):
    torch.manual_seed(1)
    m = DAGFM(F, D, L, interaction).double()
    with torch.no_grad():
        m.connect_layer.add_(0.1 * torch.randn(F, F, dtype=torch.float64))
    x = torch.randn(B, F, D, dtype=torch.float64)
    s = reference.dagfm_propagate(m.connect_layer @ x, m.p, m.q, interaction)
    expected = m.linear(s.reshape(B, -1)).squeeze(-1)  # t-major readout
    torch.testing.assert_close(m(x), expected)
    assert m(x).shape == (B,)


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
@pytest.mark.parametrize("batch", [1, B])
def test_dagfm_inference_matches_training_forward(interaction, batch):
    # Inference calls the kernels directly; the logits are the ones autograd's path computes.
    torch.manual_seed(3)
    m = DAGFM(F, D, L, interaction)
    with torch.no_grad():
        m.connect_layer.add_(0.1 * torch.randn(F, F))
    x = torch.randn(batch, F, D)
    expected = m(x)
    assert expected.requires_grad
    with torch.no_grad():
        got = m(x)
    assert got.shape == (batch,)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)


def test_dagfm_gradients_reach_the_mixing_and_emb_with_frozen_weights():
    torch.manual_seed(5)
    m = DAGFM(F, D, L, "kernel")
    for param in (m.p, m.linear.weight, m.linear.bias):
        param.requires_grad_(False)
    m(torch.randn(B, F, D)).sum().backward()
    assert m.connect_layer.grad.abs().max() > 0
    m.connect_layer.requires_grad_(False)
    x = torch.randn(B, F, D, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.abs().max() > 0


def test_dagfm_inference_keeps_readout_hooks_and_parametrizations():
    torch.manual_seed(4)
    m = DAGFM(F, D, L, "outer")
    x = torch.randn(B, F, D)
    seen = []
    handle = m.linear.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        m(x)
    assert seen == [(B, 1)]
    handle.remove()
    with torch.no_grad():
        plain = m(x)
    nn.utils.parametrize.register_parametrization(m, "p", nn.Identity())
    nn.utils.parametrize.register_parametrization(m, "connect_layer", nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain, rtol=0, atol=0)
        m.parametrizations.p.original.mul_(2.0)
        assert not torch.equal(m(x), plain)


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
def test_dagfm_init_state_dict_and_lower_triangle_grad(interaction):
    torch.manual_seed(2)
    m = DAGFM(F, D, L, interaction)
    assert torch.equal(m.connect_layer, torch.eye(F))
    shape = (L, F, F, D, D) if interaction == "kernel" else (L, F, F, D)
    assert tuple(m.p.shape) == shape
    assert (m.q is None) == (interaction != "outer")
    assert abs(m.p.std().item() - 1.414 / math.sqrt(F * D)) < 0.05
    keys = set(m.state_dict())
    assert keys == {"connect_layer", "p", "linear.weight", "linear.bias"} | ({"q"} if interaction == "outer" else set())
    m(torch.randn(B, F, D)).sum().backward()
    lower = torch.ones(F, F).tril(-1).bool()
    assert m.p.grad[:, lower].abs().max() == 0
    assert m.p.grad[:, ~lower].abs().max() > 0
    m2 = DAGFM(F, D, L, interaction)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(B, F, D)
    torch.testing.assert_close(m2(x), m(x))


def test_dagfm_bad_arguments():
    with pytest.raises(ValueError, match="interaction"):
        DAGFM(F, D, L, "cross")
    with pytest.raises(ValueError, match="depth"):
        DAGFM(F, D, 0)
    with pytest.raises(ValueError, match=r"emb: expected shape \(B, 5, 4\)"):
        DAGFM(F, D, L)(torch.randn(B, F + 1, D))
    for module in (DAGFM(F, D, L), DAGFMPlus(F, D, L)):
        for dtype in (torch.float64, torch.int64):
            with pytest.raises(ValueError, match=f"emb: expected dtype torch.float32 .*got {dtype}"):
                module(torch.ones(B, F, D, dtype=dtype))
    with pytest.raises(ValueError, match="num_fields: expected a positive int"):
        DAGFM(5.0, D, L)
    with pytest.raises(ValueError, match="depth: expected a positive int"):
        DAGFM(F, D, True)


def test_dagfm_accepts_any_integral_size():
    np = pytest.importorskip("numpy")
    model = DAGFM(np.int64(F), np.int32(D), np.int64(L))
    assert (model.num_fields, model.embed_dim, model.depth) == (F, D, L) and type(model.num_fields) is int
    assert model(torch.randn(B, F, D)).shape == (B,)


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
def test_dagfm_plus(interaction):
    torch.manual_seed(3)
    m = DAGFMPlus(F, D, 2, interaction, mlp=(8,)).double()
    x = torch.randn(B, F, D, dtype=torch.float64)
    # h0 + h1 + h2 written out for L=2; states of the reference are their per-field sums.
    h = m.hidden_sum(x)
    s = reference.dagfm_propagate(m.connect_layer @ x, m.p, m.q, interaction)
    torch.testing.assert_close(h.sum(-1), s.sum(1))
    out = m(x)
    assert out.shape == (B,)
    torch.testing.assert_close(out, m.mlp(h.reshape(B, -1)).squeeze(-1))
    assert m.flops_per_sample() > DAGFM(F, D, 2, interaction).flops_per_sample()


def test_dagfm_plus_loads_public_dag_weights():
    public = PublicDAGFM(F, D, L, "outer")
    m = DAGFMPlus(F, D, L, "outer", mlp=(8,))
    sd = {k: v for k, v in public.state_dict().items() if not k.startswith("linear")}
    m.load_official_state_dict(sd)
    torch.testing.assert_close(m.q[1], public.q[1].detach())


def test_crossnet_formula():
    torch.manual_seed(4)
    t = CrossNet(F, D, depth=2)
    x = torch.randn(B, F, D)
    x0 = x.reshape(B, -1)
    xl = x0
    for layer in t.cross:
        xl = x0 * (xl @ layer.weight.T + layer.bias) + xl
    torch.testing.assert_close(t(x), (xl @ t.linear.weight.T + t.linear.bias).squeeze(-1))
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in t.cross)


def test_cin_formula():
    torch.manual_seed(5)
    t = CIN(F, D, layers=(3, 2))
    x = torch.randn(B, F, D)
    xk, pooled = x, []
    for conv in t.convs:  # X^k_h = sum_{i,j} W^k_{h,i,j} (X^{k-1}_i * X^0_j)
        w = conv.weight.reshape(conv.out_channels, xk.shape[1], F)
        xk = torch.einsum("hij,bid,bjd->bhd", w, xk, x) + conv.bias[:, None]
        pooled.append(xk.sum(-1))
    expected = torch.cat(pooled, -1) @ t.linear.weight.T + t.linear.bias
    torch.testing.assert_close(t(x), expected.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_fm_formula():
    torch.manual_seed(6)
    t = FM(F, D)
    x = torch.randn(B, F, D)
    pair = sum((x[:, i] * x[:, j]).sum(-1) for i in range(F) for j in range(i + 1, F))
    torch.testing.assert_close(t(x), t.linear(x.reshape(B, -1)).squeeze(-1) + pair, atol=1e-5, rtol=1e-5)


def test_teacher_registry():
    assert {"crossnet", "cin"} <= set(teacher_names())
    assert isinstance(build_teacher("crossnet", F, D, depth=2), CrossNet)
    assert isinstance(build_teacher("cin", F, D, cin_layers=(4,)), CIN)
    with pytest.raises(ValueError, match=r"teacher: unknown name 'dcn\(\)'.*crossnet"):
        build_teacher("dcn()", F, D)

    class UserNet(nn.Module):  # any module mapping (B, F, D) -> (B,) logits
        def __init__(self, num_fields, embed_dim):
            super().__init__()
            self.lin = nn.Linear(num_fields * embed_dim, 1)

        def forward(self, emb):
            return self.lin(emb.flatten(1)).squeeze(-1)

    register_teacher("usernet_test", lambda num_fields, embed_dim, **_: UserNet(num_fields, embed_dim))
    try:
        t = build_teacher("usernet_test", F, D)
        assert t(torch.randn(B, F, D)).shape == (B,)
        with pytest.raises(ValueError, match="already registered"):
            register_teacher("usernet_test", lambda *a, **k: None)
    finally:
        TEACHERS.pop("usernet_test")
