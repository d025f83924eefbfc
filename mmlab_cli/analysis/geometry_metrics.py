"""Embedding-geometry metrics: each takes clouds of embeddings (rows = samples, torch tensors on any
device) and returns numbers. Formulas are in docs/geometry.md; the heavy lifting is torch, POT and
scipy. Everything is computed in float64, since the clouds are small (N x d) and the covariance
spectrum of a near-collapsed cloud needs the precision.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli.errors import MmlabError
from mmlab_cli.models.embeddings import recall_at_k, unit  # noqa: F401 (recall_at_k: one of these metrics)


def covariance(z: torch.Tensor) -> torch.Tensor:
    """Sigma = 1/N sum_n (z_n - mean)(z_n - mean)^T (the DML paper's Section 5.2: 1/N, not 1/(N-1))."""
    z = z.double()
    zc = z - z.mean(0)
    return zc.T @ zc / len(z)


def modality_variance(z: torch.Tensor) -> float:
    """Tr(Sigma): the mean squared distance of the samples to their mean (the DML paper's Section 5.2)."""
    return float(torch.trace(covariance(z)))


def variance_per_dim(z: torch.Tensor) -> float:
    """Tr(Sigma) / d: the mean per-coordinate variance, the scale the DML paper's Table 5 (x 10^3) fits."""
    return modality_variance(z) / z.shape[1]


def spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of Sigma in decreasing order (round-off negatives clipped to 0)."""
    return torch.linalg.eigvalsh(covariance(z)).flip(0).clamp_min(0)


def effective_rank_entropy(z: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank of Sigma: exp(-sum_k p_k log p_k), p_k = lambda_k / sum lambda.

    Sigma is symmetric PSD, so its singular values are its eigenvalues. 0 for a cloud with no spread."""
    eig = spectrum(z)
    total = eig.sum()
    if total <= 0:
        return 0.0
    p = eig / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank_participation(z: torch.Tensor) -> float:
    """The participation ratio (tr Sigma)^2 / ||Sigma||_F^2 = (sum lambda)^2 / sum lambda^2, the effective rank
    of the DAGR paper's Theorem 3.2 (Appendix A.3, Part D). 0 for a cloud with no spread."""
    eig = spectrum(z)
    squares = float((eig**2).sum())
    return float(eig.sum()) ** 2 / squares if squares > 0 else 0.0


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the
    singular values of the embedding matrix itself (rows = samples, not centred, as the paper). r for an
    isotropic cloud of rank r and N >> r, 1 for a rank-1 matrix; 0 for a zero matrix."""
    sigma = torch.linalg.svdvals(z.double())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def wasserstein2_sq(a: torch.Tensor, b: torch.Tensor, exact_max: int = 5000, reg: float = 0.02,
                    max_iter: int = 10_000) -> tuple[float, str]:
    """Squared 2-Wasserstein distance between the empirical (uniform-weight) distributions of two clouds.

    Exact optimal transport (POT's network simplex) when both clouds have at most `exact_max` points;
    beyond, the transport cost <P_eps, C> of the entropic plan from POT's Sinkhorn-Knopp iterations with
    regulariser `reg`, on the clouds' device, until the marginals match to 1e-6. Returns (value, method)."""
    import ot

    if max(len(a), len(b)) <= exact_max:
        cost = ot.dist(a.double().cpu().numpy(), b.double().cpu().numpy())  # squared Euclidean
        value, log = ot.emd2([], [], cost, numItermax=100 * cost.size, log=True)
        if log["warning"]:
            raise RuntimeError(f"exact optimal transport did not converge: {log['warning']}")
        return float(value), "exact"
    cost = ot.dist(a.double(), b.double())
    value = ot.sinkhorn2(torch.full((len(a),), 1 / len(a), dtype=cost.dtype, device=cost.device),
                         torch.full((len(b),), 1 / len(b), dtype=cost.dtype, device=cost.device),
                         cost, reg, numItermax=max_iter, stopThr=1e-6)
    if not torch.isfinite(value):
        raise MmlabError(f"Sinkhorn with regulariser {reg:g} underflowed (costs up to {float(cost.max()):.3g}); "
                         f"pass a larger --sinkhorn-reg or raise --exact-ot-max")
    return float(value), "sinkhorn"


def wasserstein2_floor(z: torch.Tensor, seed: int = 0, exact_max: int = 5000,
                       reg: float = 0.02) -> tuple[float, str]:
    """The same-law floor of a W2 gap: W2^2 between two random halves of one cloud (a permutation seeded by
    `seed`; an odd row is left out), i.e. what `wasserstein2_sq` reads between two samples of one law. Halves of
    N/2 points read a little more than two N-point samples would (the empirical W2 shrinks with N), so as a
    floor for an N-point gap it errs on the high side. Returns (value, method)."""
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed)).to(z.device)
    half = len(z) // 2
    return wasserstein2_sq(z[order[:half]], z[order[half:2 * half]], exact_max, reg)


def semantic_margin(z: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> dict[str, float | None]:
    """Mean Euclidean distance between samples of different classes minus that between distinct samples of
    the same class (the DAGR paper's Eq. 45), over all pairs, in row chunks of the distance matrix."""
    z = z.double()
    labels = labels.to(z.device)
    sums = {"intra": 0.0, "inter": 0.0}
    counts = {"intra": 0, "inter": 0}
    for s in range(0, len(z), chunk):
        d = torch.cdist(z[s:s + chunk], z)
        same = labels[s:s + chunk, None] == labels[None, :]
        rows = torch.arange(len(d), device=z.device)
        distinct = torch.ones_like(same)
        distinct[rows, rows + s] = False
        for key, mask in (("intra", same & distinct), ("inter", ~same)):
            sums[key] += float(d[mask].sum())
            counts[key] += int(mask.sum())
    intra = sums["intra"] / counts["intra"] if counts["intra"] else None
    inter = sums["inter"] / counts["inter"] if counts["inter"] else None
    margin = inter - intra if intra is not None and inter is not None else None
    return {"semantic_margin": margin, "intra_class_distance": intra, "inter_class_distance": inter}


def cross_modal_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean ||a_i - b_i|| over paired rows."""
    return float((a.double() - b.double()).norm(dim=1).mean())


def cross_modal_cosines(a: torch.Tensor, b: torch.Tensor, negatives: int = 10,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of the N positive pairs (a_i, b_i) and of `negatives` x N random mismatched pairs
    (a_i, b_j), j uniform over j != i, drawn with a seeded generator."""
    a, b = unit(a), unit(b)
    n = len(a)
    pos = (a * b).sum(1)
    if n < 2:
        return pos.cpu().numpy(), np.empty(0)
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n).repeat(negatives)
    j = (i + torch.randint(1, n, (len(i),), generator=gen)) % n
    neg = (a[i.to(a.device)] * b[j.to(b.device)]).sum(1)
    return pos.cpu().numpy(), neg.cpu().numpy()


def separation(pos: np.ndarray, neg: np.ndarray) -> dict[str, float | None]:
    """Mean positive and negative similarity, their gap, and the two-sample Kolmogorov-Smirnov distance
    sup_x |F_pos(x) - F_neg(x)| (scipy)."""
    from scipy.stats import ks_2samp

    if len(pos) == 0 or len(neg) == 0:
        return {"cosine_pos": None, "cosine_neg": None, "cosine_gap": None, "cosine_ks": None}
    mp, mn = float(np.mean(pos)), float(np.mean(neg))
    return {"cosine_pos": mp, "cosine_neg": mn, "cosine_gap": mp - mn, "cosine_ks": float(ks_2samp(pos, neg).statistic)}


def ati_check(fuse, embeddings: dict[str, torch.Tensor], modality: str, tau_scale: float = 0.01,
              seed: int = 0, chunk: int = 1 << 22) -> dict[str, float | None]:
    """The DML paper's ATI test (Appendix D.1, Table 13) of a fusion map phi(u, v) = fuse({.., modality: v}).

    tau_i is a random direction of norm tau_scale * ||v_i|| (seeded). With J_i = d phi / d v at (u_i, v_i)
    (forward-mode AD) and the paper's alpha_i = diag(J_i) (alpha_k = J_kk; output coordinates k >= d get no
    term), Delta_error_i = ||phi(u_i, v_i + tau_i) - phi(u_i, v_i) - alpha_i * tau_i||. Reported as Table 13
    does: feature_norm = mean ||phi(u, v)||, delta_error = mean Delta_error, eps_rel = delta_error / feature_norm;
    and taylor_error, taylor_eps_rel: the same with the full first-order term J tau in place of alpha * tau (the
    second-order remainder of phi).

    diag(J) comes from the Jacobian-vector products with the basis vectors e_k (torch.func.jvp under vmap), about
    `chunk` output numbers at a time."""
    z = {m: e.float() for m, e in embeddings.items()}
    v = z[modality]
    gen = torch.Generator(device=v.device).manual_seed(seed)
    noise = torch.randn(v.shape, generator=gen, device=v.device)
    tau = noise / noise.norm(dim=1, keepdim=True) * tau_scale * v.norm(dim=1, keepdim=True)

    def phi(x: torch.Tensor) -> torch.Tensor:
        return fuse({**z, modality: x})

    def jvp(tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi(v), J tangent) by forward-mode AD. A process's first forward-AD call makes torch script its own
        decompositions with the deprecated torch.jit.script, which warns on every geometry run; that warning is
        torch's internals, not the user's to act on, so it is silenced here."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            return torch.func.jvp(phi, (v,), (tangent,))

    with torch.no_grad():
        base, j_tau = jvp(tau)
        shift = phi(v + tau) - base
        (n, d), square = v.shape, min(base.shape[1], v.shape[1])
        diag_term = torch.zeros_like(base)
        step = max(1, chunk // base.numel())
        for start in range(0, square, step):
            ks = torch.arange(start, min(start + step, square), device=v.device)
            basis = F.one_hot(ks, d).to(v.dtype)[:, None, :].expand(len(ks), n, d)  # e_k for every row
            jac = torch.func.vmap(lambda e: jvp(e)[1])(basis)  # [k, row, output]: J e_k
            diag_term[:, ks] = jac[torch.arange(len(ks), device=v.device), :, ks].T * tau[:, ks]  # alpha_k tau_k
    norm = float(base.norm(dim=1).mean())
    err = float((shift - diag_term).norm(dim=1).mean())
    taylor = float((shift - j_tau).norm(dim=1).mean())
    return {"feature_norm": norm, "tau_norm": float(tau.norm(dim=1).mean()),
            "shift_norm": float(shift.norm(dim=1).mean()), "delta_error": err,
            "eps_rel": err / norm if norm > 0 else None, "taylor_error": taylor,
            "taylor_eps_rel": taylor / norm if norm > 0 else None}
