"""Optimizers that keep their promise under compressed gradients.

Error feedback promises that every coordinate a worker leaves out is sent later: summed over steps, the
compressed gradients equal the true ones. An optimizer that is linear in the gradient (SGD, momentum) turns
that into the same total movement of the weights. Adam is not linear: it divides by sqrt(v), the running
mean of the squared gradient, and a coordinate that Top-k sends once in 100 steps, with 100 steps' worth of
gradient, is divided by a v that its rare large values inflate and its many zeros deflate. Training then
moves far less than dense Adam (measured: ``python -m scripts.reproduce training``, AdamW on a small ViT).

1-bit Adam's remedy (Tang et al., 2021): warm up uncompressed, then freeze v. With v fixed the update is
linear in the gradient again, and error feedback's promise holds.
"""
import torch


class FrozenVarianceAdamW(torch.optim.AdamW):
    """AdamW whose second moment (``exp_avg_sq``) stops changing after ``freeze_after`` steps. From then on a
    step is m <- beta1 m + (1 - beta1) g, w <- w (1 - lr wd) - lr / (1 - beta1^t) m / (sqrt(v / (1 - beta2^f)) + eps),
    with v and f = freeze_after fixed. Pair it with ``Compression(warmup=(freeze_after, "dense"))``, so that v
    is learnt from uncompressed gradients. Before the freeze it is ``torch.optim.AdamW`` exactly.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, freeze_after=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # in the groups, so that hvd.DistributedOptimizer, which builds the optimizer again from its groups, keeps it
        for group in self.param_groups:
            group.setdefault("freeze_after", freeze_after)
            f = group["freeze_after"]
            if isinstance(f, bool) or not isinstance(f, int) or f < 1:
                raise ValueError(f"freeze_after must be a number of steps >= 1, got {f!r}")

    def _frozen(self, group):
        return any(float(self.state[p].get("step", 0)) >= group["freeze_after"] for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        if not any(self._frozen(group) for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, frozen_at = group["lr"], group["eps"], group["freeze_after"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg_sq" not in state:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} got its first gradient after the "
                                     f"second moment was frozen: it has none")
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                p.mul_(1 - lr * group["weight_decay"])
                denom = (v / (1 - beta2 ** frozen_at)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** float(state["step"])))
        return loss
