"""A torch head's candidates trained together, as one network stacked along a candidate axis.

Inside fuse (heads -> evaluate). The candidates of the ``linear`` and ``mlp`` heads differ only in weight
decay; trained apart, each starts from the same weights (the same seed), sees the same batches in the same
order and the same dropout masks. Stacked, every step is one forward and one backward for all of them: the
first layer is the batch times every candidate's weights side by side (one matrix product k times as wide),
the later layers one batched product. Each candidate keeps its own weight decay, Adam moments, validation
loss and early stopping (a candidate that stops leaves the stack), and comes out as an ordinary fitted
:class:`~featcache.fuse.torch_head.TorchClassifier`, equal to the one trained alone up to float rounding.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from featcache.device import autocast
from featcache.fuse.torch_head import make_optimizer


def stackable(heads: list) -> bool:
    """Whether ``heads`` (unfitted TorchClassifiers) differ in nothing but their weight decay."""
    same = [{k: v for k, v in h.get_params().items() if k != "weight_decay"} for h in heads]
    return len(heads) > 1 and all(s == same[0] for s in same)


def fit_stacked(heads: list, X, y, eval_set=None) -> list:
    """Fit every head of ``heads`` (:func:`stackable`) on (X, y) at once; return them, fitted.

    ``eval_set=(X_val, y_val)``: per-epoch validation and early stopping for each head, as
    :meth:`TorchClassifier.fit` does it.
    """
    import torch

    first = heads[0]
    X, y = validate_data(first, X, y, dtype=np.float32)
    check_classification_targets(y)
    classes, codes = np.unique(y, return_inverse=True)
    device = torch.device(first.device)
    generator = torch.Generator().manual_seed(first.random_state)
    template = first.build_module(X.shape[1], len(classes), generator)  # the draws each head makes alone
    stack = _Stack(template, len(heads), first, device)
    for head in heads:
        head.classes_, head.n_features_in_ = classes, X.shape[1]
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(codes.astype(np.int64)).to(device)
    validate = None
    if eval_set is not None:
        X_val = torch.from_numpy(validate_data(first, eval_set[0], dtype=np.float32, reset=False)).to(device)
        y_val = torch.from_numpy(first._encode(eval_set[1])).to(device)

        def validate():
            return stack.loss_acc(X_val, y_val)
    dropout_rng = torch.Generator(device=device).manual_seed(first.random_state + 1)
    histories, best_epochs = _train(stack, heads, Xt, yt, generator, dropout_rng, validate)
    for j, head in enumerate(heads):
        head.module_ = stack.module_of(j, head).eval()
        head.history_, head.best_epoch_ = histories[j], best_epochs[j]
    return heads


def _train(stack, heads, Xt, yt, generator, dropout_rng, validate):
    """The epoch loop of :meth:`TorchClassifier._train` for every head at once."""
    import torch

    first = heads[0]
    opt = make_optimizer(first.optimizer, stack.params, first.lr, 0.0)  # each head's decay applied below
    histories = [{"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []} for _ in heads]
    best_loss, since, best_epochs = [np.inf] * len(heads), [0] * len(heads), [None] * len(heads)
    alive = list(range(len(heads)))  # the heads still training, in the stack's order
    for epoch in range(1, first.epochs + 1):
        total = torch.zeros(len(alive), dtype=torch.float64, device=Xt.device)
        correct = torch.zeros(len(alive), dtype=torch.int64, device=Xt.device)
        order = torch.randperm(len(Xt), generator=generator).to(Xt.device)
        for start in range(0, len(Xt), first.batch_size):
            rows = order[start : start + first.batch_size]
            X_step, y_step = Xt[rows], yt[rows]
            logits = stack.forward(X_step, dropout_rng)  # (candidates, rows, classes)
            losses = stack.losses(logits, y_step)
            opt.zero_grad()
            losses.sum().backward()
            stack.decay([heads[j].weight_decay for j in alive], first.optimizer, first.lr)
            opt.step()
            total += losses.detach().double() * len(y_step)
            correct += (logits.detach().argmax(2) == y_step).sum(1)
        seen = len(Xt)
        for i, (loss, right) in enumerate(zip(total.tolist(), correct.tolist())):
            histories[alive[i]]["train_loss"].append(loss / seen)
            histories[alive[i]]["train_acc"].append(right / seen)
        if validate is None:
            continue
        stopped = []
        for i, (val_loss, val_acc) in enumerate(zip(*validate())):
            j = alive[i]
            histories[j]["val_loss"].append(val_loss)
            histories[j]["val_acc"].append(val_acc)
            if val_loss < best_loss[j]:
                stack.keep(i, j)
                best_loss[j], since[j], best_epochs[j] = val_loss, 0, epoch
            else:
                since[j] += 1
                if first.patience is not None and since[j] >= first.patience:
                    stopped.append(i)
                    if best_epochs[j] is None:  # never a finite validation loss: its last weights, as alone
                        stack.keep(i, j)
                        best_epochs[j] = epoch
        if stopped:
            kept = [i for i in range(len(alive)) if i not in stopped]
            alive = [alive[i] for i in kept]
            if not alive:
                break
            opt = stack.narrow(kept, opt, first)
    for j, history in enumerate(histories):
        if best_epochs[j] is None:  # no validation, or no finite validation loss: the last weights
            stack.keep(alive.index(j), j)
            best_epochs[j] = len(history["train_loss"])
    return histories, best_epochs


class _Stack:
    """The stacked parameters: the first layer's weight (in, k, out) and the others' (k, in, out), biases (k, out)."""

    def __init__(self, template, k: int, head, device):
        import torch

        self.dropout = head.dropout if head.hidden else 0.0
        self.params, self.axes = [], []
        for n, layer in enumerate(m for m in template if isinstance(m, torch.nn.Linear)):
            weight = layer.weight.detach().t()  # (in, out), as the batch multiplies it
            weight = weight.unsqueeze(1 if n == 0 else 0).repeat((1, k, 1) if n == 0 else (k, 1, 1))
            bias = layer.bias.detach().unsqueeze(0).repeat(k, 1)
            for tensor, axis in ((weight, 1 if n == 0 else 0), (bias, 0)):
                self.params.append(torch.nn.Parameter(tensor.contiguous().to(device)))
                self.axes.append(axis)
        self.best = [None] * k
        self.device, self.precision = device, head.precision

    def forward(self, X, dropout_rng=None):
        """Logits (k, rows, classes), float32; with ``dropout_rng``, training (dropout on)."""
        import torch

        with autocast(self.device, self.precision):
            W, b = self.params[0], self.params[1]
            n_in, k, n_out = W.shape
            x = torch.addmm(b.reshape(-1), X, W.reshape(n_in, k * n_out)).view(len(X), k, n_out).transpose(0, 1)
            for W, b in zip(self.params[2::2], self.params[3::2]):
                x = torch.relu(x)
                if dropout_rng is not None and self.dropout:  # one mask for all: the one each draws alone
                    keep = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
                    x = x * keep.bernoulli_(1 - self.dropout, generator=dropout_rng) / (1 - self.dropout)
                x = torch.baddbmm(b.unsqueeze(1), x, W)
            return x.float()

    @staticmethod
    def losses(logits, y):
        """Each candidate's mean cross-entropy on the rows, (k,)."""
        import torch

        k, rows, classes = logits.shape
        flat = torch.nn.functional.cross_entropy(logits.reshape(k * rows, classes), y.repeat(k), reduction="none")
        return flat.view(k, rows).mean(1)

    def loss_acc(self, X, y) -> tuple[list, list]:
        import torch

        with torch.inference_mode():
            logits = self.forward(X)
            return self.losses(logits, y).tolist(), (logits.argmax(2) == y).float().mean(1).tolist()

    def decay(self, decays: list, optimizer: str, lr: float) -> None:
        """Each candidate's weight decay (``decays``, by position), as torch's optimizers apply it: added to the
        gradient (adam, sgd), or the weights shrunk before the step (adamw, decoupled). Slice by slice, skipping
        the zeros: one broadcast product over the whole stack took half the step's time on the CPU."""
        import torch

        with torch.no_grad():
            for p, axis in zip(self.params, self.axes):
                for i, d in enumerate(decays):
                    if d == 0:
                        continue
                    if optimizer == "adamw":
                        p.select(axis, i).mul_(1 - lr * d)
                    else:
                        p.grad.select(axis, i).add_(p.select(axis, i), alpha=d)

    def keep(self, i: int, j: int) -> None:
        """Position ``i``'s weights as head ``j``'s best so far."""
        self.best[j] = [p.detach().select(axis, i).clone() for p, axis in zip(self.params, self.axes)]

    def narrow(self, positions: list, opt, head):
        """Keep only ``positions`` of the candidate axis, with their optimizer state; returns the new optimizer."""
        import torch

        index = torch.tensor(positions, device=self.device)
        params = []
        for p, axis in zip(self.params, self.axes):
            params.append(torch.nn.Parameter(p.detach().index_select(axis, index).contiguous()))
        new = make_optimizer(head.optimizer, params, head.lr, 0.0)
        for old, p, axis in zip(self.params, params, self.axes):
            state = opt.state.get(old, {})
            new.state[p] = {key: value.index_select(axis, index).contiguous()
                            if isinstance(value, torch.Tensor) and value.shape == old.shape else value
                            for key, value in state.items()}
        self.params = params
        return new

    def module_of(self, j: int, head):
        """Head ``j``'s kept weights as its own ``torch.nn.Sequential`` (the layout it builds alone)."""
        import torch

        scratch = torch.Generator()  # its draws are overwritten; torch's global RNG is left alone
        module = head.build_module(head.n_features_in_, len(head.classes_), scratch).to(self.device)
        linears = [m for m in module if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for layer, weight, bias in zip(linears, self.best[j][0::2], self.best[j][1::2]):
                layer.weight.copy_(weight.t())
                layer.bias.copy_(bias)
        return module
