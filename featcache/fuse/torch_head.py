"""The torch heads (``linear``, ``mlp``): a scikit-learn estimator around a small PyTorch network.

Inside fuse (fusion -> **heads** -> evaluate). :class:`TorchClassifier` follows the estimator
contract; :func:`make_optimizer` is the one optimizer factory, shared with the fine-tune.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featcache.device import autocast
from featcache.errors import check_choice
from featcache.fuse.options import OPTIMIZERS


class TorchClassifier(ClassifierMixin, BaseEstimator):
    """A PyTorch classifier head with the scikit-learn estimator contract.

    Args:
        hidden: hidden layer widths; ``()`` is softmax regression (the ``linear`` head),
            ``(512,)`` the studies' Linear(3328 -> 512) -> ReLU -> Dropout -> Linear head.
        dropout: dropout after each hidden layer.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr: learning rate.
        weight_decay: L2 penalty (decoupled for AdamW).
        epochs: maximum number of epochs.
        batch_size: rows per step.
        patience: with an ``eval_set``, stop after this many epochs without a better
            validation loss and keep the best epoch's weights; None trains all epochs.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast for the forward passes (the loss
            is computed in float32); fuse-train passes ``--precision`` resolved by the
            rule extraction uses.
        random_state: seed for initialisation, shuffling and dropout.

    Attributes:
        classes_: the class labels seen in ``fit``.
        module_: the trained ``torch.nn.Sequential``.
        history_: per epoch ``train_loss``, ``train_acc`` and, with an ``eval_set``,
            ``val_loss`` and ``val_acc``.
        best_epoch_: the epoch (1-based) whose weights were kept.
    """

    def __init__(self, *, hidden=(512,), dropout=0.2, optimizer="adam", lr=1e-3, weight_decay=0.0,
                 epochs=30, batch_size=128, patience=5, device="cpu", precision="fp32", random_state=0):
        self.hidden = hidden
        self.dropout = dropout
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.device = device
        self.precision = precision
        self.random_state = random_state

    def build_module(self, n_in: int, n_out: int, generator=None):
        """The network; with a ``generator``, initialised from it (not from torch's global RNG)."""
        import torch

        from featcache.fuse.torch_layers import SeededDropout

        layers, width = [], n_in
        for h in self.hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), SeededDropout(self.dropout)]
            width = h
        layers.append(torch.nn.Linear(width, n_out))
        if generator is not None:  # torch.nn.Linear's own rule, drawn from the head's generator
            for layer in layers:
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(layer.in_features)
                    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        return torch.nn.Sequential(*layers)

    def to_state(self) -> dict:
        """The fitted head as plain values and tensors (what a run folder stores)."""
        check_is_fitted(self, "module_")
        return {"params": self.get_params(), "state": self.module_.state_dict(), "classes": self.classes_,
                "n_features_in": self.n_features_in_, "best_epoch": self.best_epoch_, "history": self.history_}

    @classmethod
    def from_state(cls, saved: dict) -> TorchClassifier:
        """The fitted head that :meth:`to_state` described, on the CPU, ready to predict."""
        head = cls(**{**saved["params"], "device": "cpu"})
        head.classes_ = saved["classes"]
        head.n_features_in_ = saved["n_features_in"]
        head.best_epoch_ = saved["best_epoch"]
        head.history_ = saved["history"]
        head.module_ = head.build_module(head.n_features_in_, len(head.classes_))
        head.module_.load_state_dict(saved["state"])
        head.module_.eval()
        return head

    def fit(self, X, y, eval_set=None):
        """Train on (X, y); ``eval_set=(X_val, y_val)`` enables per-epoch validation and early stopping.

        ``X`` (and ``X_val``) may also be a :class:`~featcache.fuse.stream.FusedRows`, which
        streams row chunks from the caches (``fuse-train --out-of-core``): each epoch
        visits the chunks in a random order and the rows of a chunk in a random order.
        """
        import torch

        streaming = hasattr(X, "chunks")
        if streaming:
            y = np.asarray(y)
            self.n_features_in_ = X.n_features
        else:
            X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        # All randomness (initialisation, shuffling, dropout) comes from the head's own generators, not
        # torch's global RNG: the result depends on random_state alone, also when heads train concurrently.
        generator = torch.Generator().manual_seed(self.random_state)
        device = torch.device(self.device)
        self.module_ = self.build_module(self.n_features_in_, len(self.classes_), generator).to(device)
        dropout_rng = torch.Generator(device=device).manual_seed(self.random_state + 1)
        dropouts = [layer for layer in self.module_ if hasattr(layer, "generator")]
        for layer in dropouts:
            layer.generator = dropout_rng
        codes = torch.from_numpy(codes.astype(np.int64))
        if streaming:
            def batches():
                for X_chunk, rows in X.chunks(generator):
                    yield from self._batches(torch.from_numpy(X_chunk).to(device), codes[rows].to(device), generator)
        else:
            Xt, yt = torch.from_numpy(X).to(device), codes.to(device)

            def batches():
                return self._batches(Xt, yt, generator)
        validate = None
        if eval_set is not None:
            X_val, y_val = eval_set[0], torch.from_numpy(self._encode(eval_set[1])).to(device)
            if not hasattr(X_val, "chunks"):
                X_val = torch.from_numpy(validate_data(self, X_val, dtype=np.float32, reset=False)).to(device)

            def validate():
                return self._loss_acc(X_val, y_val)
        try:
            return self._train(batches, validate)
        finally:
            for layer in dropouts:
                layer.generator = None  # a fitted head holds no generator: it pickles and deep-copies

    def _batches(self, Xt, yt, generator):
        import torch

        order = torch.randperm(len(Xt), generator=generator).to(Xt.device)
        for start in range(0, len(Xt), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield Xt[rows], yt[rows]

    def _train(self, batches, validate):
        """The epoch loop: ``batches()`` yields one epoch's (X, y) steps; ``validate()`` gives (loss, accuracy)."""
        import torch

        opt = make_optimizer(self.optimizer, self.module_.parameters(), self.lr, self.weight_decay)
        self.history_ = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
        best, best_loss, since = None, np.inf, 0
        loss_fn = torch.nn.CrossEntropyLoss()
        for epoch in range(1, self.epochs + 1):
            self.module_.train()
            total, correct, seen = 0.0, 0, 0
            for X_step, y_step in batches():
                logits = self._forward(X_step)
                loss = loss_fn(logits, y_step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(y_step)
                correct += (logits.argmax(1) == y_step).sum().item()
                seen += len(y_step)
            self.history_["train_loss"].append(total / seen)
            self.history_["train_acc"].append(correct / seen)
            if validate is None:
                continue
            val_loss, val_acc = validate()
            self.history_["val_loss"].append(val_loss)
            self.history_["val_acc"].append(val_acc)
            if val_loss < best_loss:
                best, best_loss, since, self.best_epoch_ = copy.deepcopy(self.module_.state_dict()), val_loss, 0, epoch
            else:
                since += 1
                if self.patience is not None and since >= self.patience:
                    break
        if best is not None:
            self.module_.load_state_dict(best)
        else:
            self.best_epoch_ = len(self.history_["train_loss"])
        self.module_.eval()
        return self

    def _forward(self, X):
        """The module's float32 logits, under autocast at ``precision``."""
        with autocast(next(self.module_.parameters()).device, self.precision):
            return self.module_(X).float()

    def _encode(self, y) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes_)}
        try:
            return np.asarray([index[v] for v in np.asarray(y)], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"validation label {exc.args[0]!r} was not seen in training") from None

    def _loss_acc(self, X, y) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on a tensor, or on a row stream chunk by chunk."""
        import torch

        self.module_.eval()
        with torch.inference_mode():
            if not hasattr(X, "chunks"):
                logits = self._forward(X)
                return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
            device = next(self.module_.parameters()).device
            total, correct = 0.0, 0
            for X_chunk, rows in X.chunks():
                logits = self._forward(torch.from_numpy(X_chunk).to(device))
                total += torch.nn.functional.cross_entropy(logits, y[rows], reduction="sum").item()
                correct += (logits.argmax(1) == y[rows]).sum().item()
            return total / len(X), correct / len(X)

    def _logits(self, X) -> np.ndarray:
        import torch

        check_is_fitted(self)
        self.module_.eval()
        device = next(self.module_.parameters()).device
        with torch.inference_mode():
            if hasattr(X, "chunks"):  # streamed in row order
                return np.concatenate([self._forward(torch.from_numpy(c).to(device)).cpu().numpy()
                                       for c, _ in X.chunks()])
            X = validate_data(self, X, dtype=np.float32, reset=False)
            return self._forward(torch.from_numpy(X).to(device)).cpu().numpy()

    def decision_function(self, X) -> np.ndarray:
        """Logits; for two classes the single margin of the second, as scikit-learn expects."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X) -> np.ndarray:
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        codes = self._logits(X).argmax(axis=1)
        return self.classes_[codes]


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """The optimizer ``name`` (adam, adamw or sgd) over ``params`` (tensors, or parameter groups with their own lr).

    Fused (one kernel updates every tensor) where this torch has it for the device: on the CPU the
    default Adam step took 9.6 ms against 1.2 fused for the mlp head's 1.7 M weights (torch 2.15, one
    thread), a quarter of the head's training time; torch before 2.4 fuses on GPUs only.
    """
    import torch

    check_choice("--optimizer", name, OPTIMIZERS)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    params = list(params)
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # "fused=True requires ... supported devices", or no such argument yet
        return cls(params, lr=lr, weight_decay=weight_decay)
