"""Geometry metrics against closed forms, hand-computed cases and reference solvers (no training)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist, pdist, squareform
from scipy.stats import ortho_group

from mmlab_cli.analysis import geometry_metrics as gm
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.models.fusion import LateFusion


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def test_w2_of_a_shifted_cloud_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    shift = np.array([0.5, -1.0, 0.25, 0.0, 2.0, -0.3])
    b = (a + shift)[rng.permutation(300)]  # shuffled, so the optimal coupling is not the row order
    value, method = gm.wasserstein2_sq(_t(a), _t(b))
    assert method == "exact"
    assert value == pytest.approx(float(shift @ shift), rel=1e-9)


def test_exact_w2_matches_an_assignment_solver_and_sinkhorn_is_close():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) * 0.5 + 0.3
    cost = cdist(a, b, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)  # equal-size uniform clouds: an optimal plan is a permutation
    reference = cost[rows, cols].mean()
    assert gm.wasserstein2_sq(_t(a), _t(b))[0] == pytest.approx(reference, rel=1e-9)
    approx, method = gm.wasserstein2_sq(_t(a), _t(b), exact_max=100, reg=0.02)
    assert method == "sinkhorn"
    assert reference <= approx <= 1.05 * reference  # the entropic plan's cost is above the optimum, close to it


def test_effective_rank_closed_forms():
    rng = np.random.default_rng(2)
    iso = _t(rng.normal(size=(50_000, 8)))
    assert gm.effective_rank_entropy(iso) == pytest.approx(8, abs=0.02)  # isotropic: d
    assert gm.effective_rank_participation(iso) == pytest.approx(8, abs=0.02)
    line = _t(rng.normal(size=(500, 1)) * rng.normal(size=(1, 8)) + rng.normal(size=8))
    assert gm.effective_rank_entropy(line) == pytest.approx(1.0, abs=1e-6)  # rank 1: 1
    assert gm.effective_rank_participation(line) == pytest.approx(1.0, abs=1e-9)
    flat = _t(np.ones((5, 3)))  # no spread
    assert gm.effective_rank_entropy(flat) == 0.0 and gm.effective_rank_participation(flat) == 0.0


def test_rankme_closed_forms():
    """Garrido et al. (2023): an isotropic cloud of rank r reads ~r, a rank-1 matrix 1 (up to the eps terms)."""
    rng = np.random.default_rng(3)
    basis = ortho_group.rvs(12, random_state=4)[:5]  # 5 orthonormal directions in 12 dimensions
    iso = _t(rng.normal(size=(40_000, 5)) @ basis)
    assert gm.rankme(iso) == pytest.approx(5, abs=0.02)
    line = _t(rng.normal(size=(500, 1)) * rng.normal(size=(1, 12)))
    assert gm.rankme(line) == pytest.approx(1.0, abs=1e-4)
    assert gm.rankme(_t(np.zeros((5, 3)))) == 0.0
    # singular values (3, 1) -> p = (3/4, 1/4) (+ 1e-7): exp of its entropy
    two = _t(np.diag([3.0, 1.0]))
    p = np.array([0.75, 0.25]) + 1e-7
    assert gm.rankme(two) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_w2_floor_is_pots_w2_between_the_seeded_halves_and_below_a_real_gap():
    import ot

    rng = np.random.default_rng(5)
    a = _t(rng.normal(size=(401, 8)))  # odd: one row is left out
    floor, method = gm.wasserstein2_floor(a, seed=9)
    order = torch.randperm(401, generator=torch.Generator().manual_seed(9)).numpy()
    x, y = a.numpy()[order[:200]], a.numpy()[order[200:400]]
    assert method == "exact"
    assert floor == pytest.approx(ot.emd2([], [], ot.dist(x, y)), rel=1e-9)
    assert 0 < floor < 0.5 * 2 * 8  # small against the W2^2 of two independent points, E||x - y||^2 = 2d
    assert gm.wasserstein2_floor(a, seed=9)[0] == floor and gm.wasserstein2_floor(a, seed=10)[0] != floor
    b = _t(rng.normal(size=(401, 8)) * 1.5 + 2.0)  # another law: W2^2 = 8 * 2^2 (shift) + 8 * 0.5^2 (scale) = 34
    gap = gm.wasserstein2_sq(a, b)[0]
    assert gap > 2 * max(floor, gm.wasserstein2_floor(b, seed=9)[0])


def test_two_effective_ranks_and_tr_over_d_on_known_eigenvalues():
    """{+-sqrt(d lambda_k) e_k} has covariance diag(lambda) (1/N); rotated and shifted, the same eigenvalues."""
    lam, d = np.array([4.0, 2.0, 1.0, 1.0, 0.0]), 5
    axes = np.sqrt(d * lam)[:, None] * np.eye(d)
    rotation = ortho_group.rvs(d, random_state=7)
    cloud = _t(np.concatenate([axes, -axes]) @ rotation.T + 3.0)
    assert gm.spectrum(cloud).numpy() == pytest.approx(lam, abs=1e-12)
    # p = (1/2, 1/4, 1/8, 1/8, 0): entropy (1/2 + 2/4 + 2 * 3/8) ln 2 = 1.75 ln 2
    assert gm.effective_rank_entropy(cloud) == pytest.approx(2 ** 1.75, rel=1e-12)
    assert gm.effective_rank_participation(cloud) == pytest.approx(8.0**2 / (16 + 4 + 1 + 1), rel=1e-12)  # 32 / 11
    assert gm.modality_variance(cloud) == pytest.approx(8.0, rel=1e-12)
    assert gm.variance_per_dim(cloud) == pytest.approx(8.0 / 5, rel=1e-12)


def test_semantic_margin_against_pdist():
    rng = np.random.default_rng(4)
    z, y = rng.normal(size=(37, 3)), rng.integers(0, 3, 37)
    d = squareform(pdist(z))
    same = (y[:, None] == y[None, :]) & ~np.eye(37, dtype=bool)
    diff = y[:, None] != y[None, :]
    got = gm.semantic_margin(_t(z), torch.from_numpy(y), chunk=8)  # chunks of 8 rows: crosses the diagonal
    assert got["intra_class_distance"] == pytest.approx(d[same].mean(), rel=1e-12)
    assert got["inter_class_distance"] == pytest.approx(d[diff].mean(), rel=1e-12)
    assert got["semantic_margin"] == pytest.approx(d[diff].mean() - d[same].mean(), rel=1e-12)
    single = gm.semantic_margin(_t(z[:3]), torch.tensor([0, 1, 2]))  # no two samples share a class
    assert single["intra_class_distance"] is None and single["semantic_margin"] is None


def test_drift_hand_computed():
    a, b = _t([[1, 0], [0, 1]]), _t([[0, 1], [0, 1]])
    assert gm.cross_modal_drift(a, b) == pytest.approx(np.sqrt(2) / 2)


def test_recall_at_k():
    rng = np.random.default_rng(5)
    z = _t(rng.normal(size=(60, 8)))
    assert gm.recall_at_k(z, z) == {1: 1.0, 5: 1.0, 10: 1.0}  # identical embeddings
    # queries e1, e2, e3; gallery e2, e1, e3: partners of the first two rank second, the third ranks first
    e = np.eye(3)
    assert gm.recall_at_k(_t(e), _t(e[[1, 0, 2]]), ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: 1.0}


def test_cosine_separation_and_ks():
    rng = np.random.default_rng(6)
    x = rng.normal(size=500)
    same = gm.separation(x, x.copy())
    assert same["cosine_ks"] == 0.0 and same["cosine_gap"] == 0.0  # identical samples
    apart = gm.separation(x + 100, x)
    assert apart["cosine_ks"] == 1.0 and apart["cosine_gap"] == pytest.approx(100)
    z = _t(rng.normal(size=(50, 4)))
    pos, neg = gm.cross_modal_cosines(z, z, negatives=20, seed=0)
    assert np.allclose(pos, 1.0) and len(neg) == 1000 and np.all(neg < 1 - 1e-9)  # never pairs i with itself
    again = gm.cross_modal_cosines(z, z, negatives=20, seed=0)[1]
    assert np.array_equal(neg, again)  # seeded


def _fusion(fusion: str, dim: int = 6, classes: int = 4) -> LateFusion:
    torch.manual_seed(0)
    spec = ModalitySpec((5,), "float32", "features")
    return LateFusion({"a": spec, "b": spec}, classes, encoder="mlp", dim=dim, fusion=fusion).eval()


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_ati_of_an_affine_fusion_is_exact_to_first_order(fusion):
    model = _fusion(fusion)
    z = {m: torch.randn(64, 6) for m in ("a", "b")}
    for m in ("a", "b"):
        r = gm.ati_check(model.fuse, z, m, tau_scale=0.01)
        assert r["taylor_eps_rel"] < 1e-5  # float32 round-off only
        assert r["shift_norm"] > 1e3 * r["taylor_error"]
        assert r["eps_rel"] > 1e-4  # the head's weight is not diagonal: alpha * tau misses W tau


def test_ati_of_a_linear_fusion_with_known_weights():
    """phi = W [u | v] + b with the v block W_v = c I + s P, P the cyclic shift (zero diagonal, orthogonal):
    alpha = diag(W_v) = c, so Delta_error = ||s P tau|| = s ||tau|| = s * tau_scale * ||v|| for every row."""
    d, c, s = 6, 0.5, 0.3
    model = _fusion("concat", dim=d, classes=d)  # K = d outputs: a square Jacobian
    with torch.no_grad():
        model.head.weight[:, d:] = c * torch.eye(d) + s * torch.roll(torch.eye(d), 1, dims=1)
        z = {"a": torch.randn(64, d), "b": torch.randn(64, d)}
        norm = float(model.fuse(z).norm(dim=1).mean())
    r = gm.ati_check(model.fuse, z, "b", tau_scale=0.01)
    v_norm = float(z["b"].norm(dim=1).mean())
    assert r["tau_norm"] == pytest.approx(0.01 * v_norm, rel=1e-5)
    assert r["delta_error"] == pytest.approx(s * 0.01 * v_norm, rel=1e-3)
    assert r["feature_norm"] == pytest.approx(norm, rel=1e-6)
    assert r["eps_rel"] == pytest.approx(r["delta_error"] / norm, rel=1e-12)
    assert r["taylor_error"] < 1e-3 * r["delta_error"]


def test_ati_in_a_fresh_process_prints_no_torch_deprecation_warning():
    """torch's first forward-AD call of a process warns about its own use of torch.jit.script."""
    code = ("import torch\nfrom mmlab_cli.analysis.geometry_metrics import ati_check\n"
            "z = {m: torch.randn(8, 4) for m in 'uv'}\n"
            "ati_check(lambda e: torch.nn.functional.log_softmax(e['u'] * e['v'], 1), z, 'v')\n")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ati_of_addition_is_exact_with_the_diagonal_and_nonlinear_error_is_second_order():
    z = {m: torch.randn(64, 6) for m in ("u", "v")}
    add = gm.ati_check(lambda e: e["u"] + e["v"], z, "v")  # the paper's additive fusion: alpha = 1
    assert add["delta_error"] < 1e-6 and add["taylor_error"] < 1e-6 and add["eps_rel"] < 1e-6
    assert add["feature_norm"] == pytest.approx(float((z["u"] + z["v"]).norm(dim=1).mean()), rel=1e-6)
    assert add["shift_norm"] == pytest.approx(add["tau_norm"], rel=1e-4)  # phi(u, v + tau) - phi(u, v) = tau
    # an elementwise map has a diagonal Jacobian: alpha * tau = J tau, so both errors are the same remainder,
    # whether diag(J) is taken one basis vector per pass or all at once
    elementwise = [gm.ati_check(lambda e: e["u"] * torch.tanh(3 * e["v"]), z, "v", chunk=c) for c in (1, 1 << 22)]
    for r in elementwise:
        assert r["taylor_error"] > 1e-5 and r["delta_error"] == pytest.approx(r["taylor_error"], rel=1e-4)
    assert elementwise[0] == pytest.approx(elementwise[1], rel=1e-5)
    w = torch.randn(6, 12)

    def tanh_mlp(e):
        return torch.tanh(torch.cat([e["u"], e["v"]], 1) @ w.T)

    small, smaller = (gm.ati_check(tanh_mlp, z, "v", tau_scale=t) for t in (0.02, 0.01))
    assert small["taylor_error"] > 1e-4
    assert smaller["taylor_error"] / small["taylor_error"] == pytest.approx(0.25, rel=0.1)

