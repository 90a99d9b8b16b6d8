"""Many logistic regressions at once: every C of many tap combinations, one batched L-BFGS.

Flow: sweep/run -> probes -> **lanes** (-> path.rotate), and fuse-train's logreg. A lane is one
(combination, C). Each combination's features are rotated into their row space (:func:`~featcache.solvers.path.rotate`:
at most as many columns as rows, orthogonal), padded with zero columns to the widest of the batch
and stacked, so that one batched product scores every lane: on the CPU that replaces the many small
products and the per-step bookkeeping of one L-BFGS per C (most of the time on 800 rows), on a GPU
the kernel launches. Padded columns are zero, so their weights get no gradient and stay zero. On
the 24 tap pairs of ``benchmarks/sweep.py --solvers`` (900 rows, 96 lanes) this took 9.0-9.1 s
against 12.6-12.9 s for path.solve_path's one C at a time; at 45,000 x 1,792 (one combination,
``--large --solvers``) 34.6 s against 37.4 s (benchmarks/RESULTS.md, "Sixth run").

Each lane keeps its own L-BFGS history, step length and stopping test (:func:`minimise`); only the
evaluations are shared. Lanes that stopped keep their weights, and the batch drops a combination
whose lanes all stopped, so the slowest lane does not make every other one pay.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

ARMIJO = 1e-4
HALVINGS = 30

# A batch's memory at most this many bytes on the CPU (BATCH_BYTES) and on a GPU: its stacked features, padded to
# its widest problem, its lanes' L-BFGS histories and its scores (:func:`problem_bytes`). On the CPU small batches
# won: every tap and pair of resnet18 x mobilenet_v2 (55 problems, 16 to 1,792 columns), the whole logreg sweep on
# 2,700 fit rows took 108.4 s in batches of 1 GB (one batch), 79.8 at 256 MB, 48.2 at 64 MB, 35.7 at 16 MB, 36.0
# one problem a batch; on 810 fit rows 19.8-21.5 s at 1 GB, 15.3 at 64 MB, 14.7-15.1 at 16 MB, 13.2 at 4 MB, 17.7
# one a batch (AMD EPYC Zen 3, 2 cores: a narrow problem padded to the batch's widest costs its full width). A
# GPU's launches favour large batches: not measured there (benchmarks/gpu.sh's sweep_pairs step).
BATCH_BYTES = 16 << 20
GPU_BATCH_BYTES = 1 << 30
# The rotations a batch keeps for the same combinations' svm (solve_many's ``rotations``), at most this many bytes
KEPT_BYTES = 1 << 30


def batch_limit(device_type: str) -> int:
    """The bytes a batch of problems may hold on a device of this type (``cpu``, ``cuda``)."""
    return GPU_BATCH_BYTES if device_type == "cuda" else BATCH_BYTES

# L-BFGS's pairs kept per lane. On 45,000 x 1,792 (benchmarks/sweep.py --large, four C) 50 took 212
# evaluations and 34.7 s against 370 and 60.7 s with 20 (path.solve_path, cold: 47.9 s); on the
# 24 tap pairs of 800 rows 20 was a little faster (6.6 against 6.8-7.1 s: the two loops read every pair
# of every lane), to the same objectives
HISTORY = 50


def minimise(problem, x, max_iter: int = 1000, tol_grad: float = 1e-5, tol_change: float = 1e-8):
    """Minimise G independent functions of x (G, P) lane by lane; returns x.

    ``problem.evaluate(x)`` returns (values (G,), gradients (G, P)) for the lanes it still holds;
    ``problem.keep(mask)`` is offered the lanes still running and returns the mask of lanes it keeps
    (it may keep finished lanes that share data with running ones). A lane stops, as
    ``torch.optim.LBFGS``'s test, when its largest gradient entry is at most ``tol_grad`` or a step
    changes its value or its variables by less than ``tol_change``. The line search backtracks from
    the whole step (Armijo): the objectives are strongly convex, so every step's curvature pair is
    usable (a lane skips pairs with ``s'y <= 0`` anyway).
    """
    import torch

    history = HISTORY
    out = x.clone()
    where = torch.arange(x.shape[0], device=x.device)  # the original lane of each row held
    S, Y = x.new_zeros((history, *x.shape)), x.new_zeros((history, *x.shape))
    rho = x.new_zeros(history, x.shape[0])  # 0: an empty or skipped pair, which the two loops pass over
    gamma = x.new_ones(x.shape[0])
    f, g = problem.evaluate(x)
    active = g.abs().amax(1) > tol_grad
    order = []  # the history's slots, oldest first
    running = len(active)  # lanes running when the batch last shrank
    for it in range(max_iter):
        if not active.any():
            break
        if int(active.sum()) <= running * 3 // 4:  # a quarter have stopped since: drop what no running lane needs
            running = int(active.sum())
            held = problem.keep(active)
            out[where[~held]] = x[~held]
            x, f, g, active, gamma, where = x[held], f[held], g[held], active[held], gamma[held], where[held]
            S, Y, rho = S[:, held], Y[:, held], rho[:, held]
        d = -g * (1.0 / g.abs().sum(1)).clamp(max=1.0).unsqueeze(1) if it == 0 else -_two_loops(g, S, Y, rho, gamma,
                                                                                                   order)
        d = torch.where(active.unsqueeze(1), d, torch.zeros_like(d))
        slope = (g * d).sum(1)
        active &= slope < -tol_change  # no descent left to take
        t = torch.where(active, 1.0, 0.0).to(x)
        for _ in range(HALVINGS):
            x_new = x + t.unsqueeze(1) * d
            f_new, g_new = problem.evaluate(x_new)
            enough = (f_new <= f + ARMIJO * t * slope) | ~active
            if enough.all():
                break
            t = torch.where(enough, t, t / 2)
        s, y = x_new - x, g_new - g
        ys = (s * y).sum(1)
        keep = active & (ys > 1e-10 * (y * y).sum(1))
        slot = it % history
        S[slot], Y[slot] = s, y
        rho[slot] = torch.where(keep, 1.0 / ys.clamp(min=1e-300), 0.0)
        gamma = torch.where(keep, ys / (y * y).sum(1).clamp(min=1e-300), gamma)
        order = [*order, slot][-history:]
        changed, moved = (f - f_new).abs(), s.abs().amax(1)
        x = torch.where(active.unsqueeze(1), x_new, x)
        f = torch.where(active, f_new, f)
        g = torch.where(active.unsqueeze(1), g_new, g)
        active &= (g.abs().amax(1) > tol_grad) & (changed >= tol_change) & (moved > tol_change)
    out[where] = x
    return out


def _two_loops(g, S, Y, rho, gamma, order: list):
    """``H g`` for every lane at once by the two-loop recursion over the lanes' own pairs (``order``: the
    slots, oldest first)."""
    q = g.clone()
    alphas = []
    for slot in reversed(order):
        alpha = rho[slot] * (S[slot] * q).sum(1)
        q -= alpha.unsqueeze(1) * Y[slot]
        alphas.append((slot, alpha))
    r = gamma.unsqueeze(1) * q
    for slot, alpha in reversed(alphas):
        beta = rho[slot] * (Y[slot] * r).sum(1)
        r += S[slot] * (alpha - beta).unsqueeze(1)
    return r


class _Logistic:
    """The lanes' objectives: ``(C * sum(cross-entropy) + |W|^2 / 2) / (C * n)`` per (combination, C), the
    intercept (the last column of ones) not penalised, on the stacked rotated features ``Z`` (B, n, R + 1).
    L-BFGS works on ``u = W / scale``, ``scale`` the diagonal preconditioner of the solvers' path.

    Lanes are held one by one, in combination order (``comb``: each lane's row of ``Z``): while every held
    combination holds the same number of lanes one batched product scores them all, else a product per
    combination; so a C that has converged stops costing products (at 45,000 x 1,792 the largest C takes
    five times the evaluations of the smallest)."""

    def __init__(self, Z, scale, y, Cs, n_classes: int):
        import torch

        B, n, width = Z.shape
        G = len(Cs)
        self.Z, self.k = Z, n_classes
        self.scale = scale.reshape(B * G, width, 1)  # scale: (B, G, R + 1, 1)
        self.C = torch.as_tensor(np.asarray(Cs, np.float64), dtype=Z.dtype, device=Z.device).repeat(B)
        self.onehot = torch.zeros(1, n, n_classes, dtype=Z.dtype, device=Z.device)
        self.onehot[0, torch.arange(n, device=Z.device), y] = 1.0
        self.penalised = torch.ones(1, width, 1, dtype=Z.dtype, device=Z.device)
        self.penalised[:, -1] = 0.0
        self._held(torch.arange(B, device=Z.device).repeat_interleave(G))

    def _held(self, comb) -> None:
        """Hold the lanes of rows ``comb`` of ``Z``: (row, first lane, end lane) per row, and whether every row
        holds as many (one batched product)."""
        counts = np.bincount(comb.cpu().numpy(), minlength=len(self.Z))
        ends = np.cumsum(counts)
        self.comb, self.groups = comb, [(b, int(end - c), int(end)) for b, (c, end) in enumerate(zip(counts, ends))]
        self.G = int(counts[0]) if len(set(counts.tolist())) == 1 else 0

    def evaluate(self, flat):
        import torch

        B, n, width = self.Z.shape
        L, k, G = len(self.comb), self.k, self.G
        W = self.scale * flat.view(L, width, k)
        if G:  # as many lanes on every row: one batched product
            scores = torch.bmm(self.Z, W.view(B, G, width, k).permute(0, 2, 1, 3).reshape(B, width, G * k))
            scores = scores.view(B, n, G, k).transpose(1, 2).reshape(L, n, k)
        else:
            scores = torch.cat([(self.Z[b] @ W[lo:hi].permute(1, 0, 2).reshape(width, (hi - lo) * k))
                                .view(n, hi - lo, k).transpose(0, 1) for b, lo, hi in self.groups])
        # per row first: the difference of the two sums loses float32's digits
        top = scores.amax(dim=2, keepdim=True)
        e = (scores - top).exp_()
        total = e.sum(dim=2, keepdim=True)
        data = (top + total.log() - (scores * self.onehot).sum(2, keepdim=True)).sum(dim=(1, 2))
        R = e.div_(total).sub_(self.onehot).transpose(1, 2)  # (L, k, n)
        if G:  # reads Z row-major
            grad = torch.bmm(R.reshape(B, G * k, n), self.Z).view(L, k, width).transpose(1, 2)
        else:
            grad = torch.cat([(R[lo:hi].reshape((hi - lo) * k, n) @ self.Z[b]).view(hi - lo, k, width)
                              .transpose(1, 2) for b, lo, hi in self.groups])
        grad = grad + self.penalised * W / self.C.view(L, 1, 1)
        value = (data + 0.5 * (W.pow(2) * self.penalised).sum(dim=(1, 2)) / self.C) / n
        return value, (self.scale * grad / n).reshape(L, -1)

    def keep(self, running):
        """Keep the running lanes, and the rows of ``Z`` that a running lane reads."""
        import torch

        comb = self.comb[running].cpu().numpy()
        rows = np.bincount(comb, minlength=len(self.Z)) > 0
        self.Z = self.Z[torch.as_tensor(rows, device=self.Z.device)]
        self.scale, self.C = self.scale[running], self.C[running]
        self._held(torch.as_tensor((np.cumsum(rows) - 1)[comb], device=self.Z.device))
        return running


def solve_many(problems: list, y, Cs, n_classes: int, max_iter: int = 1000, tol: float = 1e-5,
               rotations: list | None = None) -> list:
    """For each problem of ``problems`` (a list of tap blocks (n, d_t) on the same rows, fused side by side),
    one multinomial logistic regression (sum d_t + 1, k) per C, in the order of ``Cs``: scikit-learn's
    objective, solved for every problem and C at once, in batches of at most :func:`batch_limit`. A block
    shared by several problems (a tap in many pairs) is squared once.

    ``rotations``, a list: each problem's rotation ``(Z, S, back)`` is appended to it for the same
    combination's svm (``solvers.solve_path(rotated=)``) where it went through the rows' Gram matrix
    (fewer rows than features) and those a batch keeps stay within ``KEPT_BYTES``; None where not."""
    grams: dict = {}
    out = []
    sizes = [_batch_bytes(blocks, len(Cs), n_classes) for blocks in problems]
    for part in partition(sizes, batch_limit(y.device.type if hasattr(y, "device") else "cpu")):
        batch, kept_bytes = [problems[i] for i in part], 0

        def rotated(blocks):
            nonlocal kept_bytes
            Z, S, back = _rotated(blocks, grams)
            if rotations is not None:
                kept = len(Z) < sum(b.shape[1] for b in blocks) and kept_bytes + _bytes(Z) <= KEPT_BYTES
                kept_bytes += _bytes(Z) if kept else 0
                rotations.append((Z, S, back) if kept else None)
            return Z, S, back

        out += _solve_batch(batch, rotated, y, Cs, n_classes, max_iter, tol)
    return out


def partition(sizes: list[int], limit: int) -> list[list[int]]:
    """The batches :func:`solve_many` solves problems of ``sizes`` bytes in (:func:`problem_bytes`), in order: each
    as many problems as fit in ``limit`` bytes (:func:`batch_limit`; at least one). A problem's numbers depend on its batch (its stacked
    products' shapes and padding), so a sweep split across processes gives each whole batches."""
    out, batch, size = [], [], 0
    for i, bytes_ in enumerate(sizes):
        if batch and size + bytes_ > limit:
            out.append(batch)
            batch, size = [], 0
        batch.append(i)
        size += bytes_
    return out + ([batch] if batch else [])


# Solutions of this process's last solves, by problem (:func:`_key`), on their rotated features: a sweep's kept run
# fits the row it keeps again through fuse-train, which starts from the sweep's solution and stops at L-BFGS's
# first test (at CIFAR size one evaluation instead of a second solve). A start only: the result is L-BFGS's.
_SOLVED: OrderedDict = OrderedDict()
SOLVED_KEPT = 256  # lanes (a few MB at 1,792 columns and 10 classes)


def _key(blocks: list, y, S) -> str:
    """A problem's identity for :data:`_SOLVED` (a lane's key adds its C), the same however its columns are split
    into blocks (a sweep's two taps, a kept run's one fused matrix): its shape, every 97th row's bytes, the labels and
    its rotation's spectrum (the same rotation)."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((len(blocks[0]), sum(b.shape[1] for b in blocks), str(blocks[0].dtype))).encode())
    digest.update(torch.cat([b[::97] for b in blocks], dim=1).cpu().numpy().tobytes())
    for part in (y, S):
        digest.update(part.cpu().numpy().tobytes())
    return digest.hexdigest()


def _bytes(Z) -> int:
    return Z.numel() * Z.element_size()


def _batch_bytes(blocks, G: int, k: int) -> int:
    return problem_bytes(len(blocks[0]), [b.shape[1] for b in blocks], G, k, blocks[0].element_size())


def problem_bytes(n: int, widths: list[int], G: int, k: int, itemsize: int = 4) -> int:
    """What one problem (``n`` rows of taps ``widths`` wide, G C's, k classes) adds to a batch: its rotated features
    (rows x columns), the two L-BFGS histories and the few copies of weights and gradients of its G lanes (columns x
    k each), its scores (rows x G x k, a few copies)."""
    width = min(n, sum(widths)) + 1
    return (n * width + (2 * HISTORY + 8) * G * k * width + 6 * n * G * k) * itemsize


def _rotated(blocks: list, grams: dict):
    """(Z, S, back): the fused blocks rotated into their row space as :func:`~featcache.solvers.path.rotate` does,
    the lengths of ``Z``'s (orthogonal) columns, and the map of a solution on ``Z``'s columns back to the fused
    features' (``back(u)``: (r, k) -> (d, k)).

    With fewer rows than features the rows' Gram matrix is the sum of the blocks' (each computed once, in
    float64, kept in ``grams`` by block), ``Z = U S`` from its eigenvectors, and ``w = X' U S^-1 u`` block
    by block; otherwise :func:`~featcache.solvers.path.rotate`'s features' form, ``Z = X V``, ``w = V u``."""
    import torch

    from featcache.solvers.path import rotate, row_space

    n = len(blocks[0])
    if n >= sum(b.shape[1] for b in blocks):
        X = torch.cat(blocks, dim=1)
        _, V, S = rotate(X)
        return X @ V, S, lambda u: V @ u
    for b in blocks:
        if id(b) not in grams:  # the block is kept with its Gram matrix, so its id is not reused meanwhile
            grams[id(b)] = (b, b.double() @ b.double().T)
    S, U = row_space(sum(grams[id(b)][1] for b in blocks))
    dtype = blocks[0].dtype
    combination = (U / S).to(dtype)  # Z's coordinates -> the rows' combination
    return (U * S).to(dtype), S, lambda u: torch.cat([b.T @ (combination @ u) for b in blocks])


def _solve_batch(batch: list, rotated, y, Cs, n_classes: int, max_iter: int, tol: float) -> list:
    """Solve the problems of ``batch``, each rotated by ``rotated(blocks) -> (Z, S, back)`` straight into the stack
    (one problem's rotated copy alive at a time besides it: at 45,000 rows a copy is 323 MB)."""
    import torch

    from featcache.solvers.path import CURVATURE

    first = batch[0][0]
    n = len(y)
    R = max(min(n, sum(b.shape[1] for b in blocks)) for blocks in batch)  # the widest a rotation can be
    B, G = len(batch), len(Cs)
    Z = first.new_zeros(B, n, R + 1)
    scale = first.new_ones(B, G, R + 1, 1)
    C = torch.as_tensor(np.asarray(Cs, np.float64), dtype=torch.float64, device=first.device).view(G, 1)
    widths, backs, spectra = [], [], []
    for b, blocks in enumerate(batch):
        Zb, S, back = rotated(blocks)
        spectra.append(S)
        r = Zb.shape[1]
        Z[b, :, :r] = Zb
        scale[b, :, :r, 0] = (1.0 + C * CURVATURE * S.double().pow(2)).rsqrt().to(Z.dtype)
        widths.append(r)
        backs.append(back)
        del Zb
    Z[:, :, R] = 1.0
    problem = _Logistic(Z, scale, y, Cs, n_classes)
    start = Z.new_zeros(B, G, R + 1, n_classes)
    problem_keys = [_key(blocks, y, S) for blocks, S in zip(batch, spectra)]  # each problem hashed once
    keys = [[f"{problem_key}-{C!r}" for C in Cs] for problem_key in problem_keys]
    for b, g in np.ndindex(B, G):
        if keys[b][g] in _SOLVED:  # solved before in this process: a start, which L-BFGS's own test accepts or not
            _SOLVED.move_to_end(keys[b][g])
            start[b, g, :widths[b]], start[b, g, R] = (v.to(Z) for v in _SOLVED[keys[b][g]])
    with torch.no_grad():
        U = minimise(problem, (start / scale).reshape(B * G, -1), max_iter, tol, tol * 1e-3)
    W = scale * U.view(B, G, R + 1, n_classes)
    for b, g in np.ndindex(B, G):
        _SOLVED[keys[b][g]] = (W[b, g, :widths[b]].clone(), W[b, g, R].clone())
        while len(_SOLVED) > SOLVED_KEPT:
            _SOLVED.popitem(last=False)
    return [[torch.cat([back(W[b, g, :widths[b]]), W[b, g, R:]]) for g in range(G)] for b, back in enumerate(backs)]
