"""Optimizers that keep their promise under compressed gradients.

Error feedback promises that every coordinate a worker leaves out is sent later: summed over steps, the
compressed gradients equal the true ones. An optimizer that is linear in the gradient (SGD, momentum) turns
that into the same total movement of the weights. Adam is not linear: it divides by sqrt(v), the running
mean of the squared gradient, and a coordinate that Top-k sends once in 100 steps, with 100 steps' worth of
gradient, is divided by a v that its rare large values inflate and its many zeros deflate. Training then
moves far less than dense Adam (measured: ``python -m scripts.reproduce training``, AdamW on a small ViT).

1-bit Adam's remedy (Tang et al., 2021): warm up uncompressed, then freeze v. With v fixed the update is
linear in the gradient again, and error feedback's promise holds. With Top-k, compressing Adam's first
moment instead of the gradient (as 1-bit Adam compresses its momentum) is Deep Gradient Compression's momentum
correction in Adam's form: ``MomentumCorrectedAdamW``.
"""
import torch

from .. import options


def _loss_of(closure):
    """What torch's optimizers do with a closure: run it with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _stepped(groups):
    """(group, parameter) for each parameter with a gradient in this step."""
    return ((group, p) for group in groups for p in group["params"] if p.grad is not None)


def check_momentum_of(config, groups):
    """The momentum is applied once: in the Compression (momentum correction) or in the optimizer, whose
    param groups (``groups``) the Compression checks at its first step."""
    momentum, masking, warmup = config.momentum, config.momentum_masking, config.warmup
    doubled = sorted({group.get("momentum", 0) for group in groups} - {0})
    adam_like = any("betas" in group and not group.get("first_moment_compressed") for group in groups)
    options.refuse_second_momentum(momentum, doubled[0] if doubled else 0, adam_like, "use hc.MomentumCorrectedAdamW")
    for group in groups:
        if group.get("first_moment_compressed"):   # MomentumCorrectedAdamW
            wanted = (group["betas"][0], False, (group["freeze_after"], "dense"))
            if (momentum, masking, warmup) != wanted:
                raise ValueError(
                    f"hc.MomentumCorrectedAdamW needs Compression(momentum={wanted[0]}, momentum_masking=False, "
                    f"warmup=({wanted[2][0]}, 'dense')) (its beta1 and freeze_after); got momentum={momentum}, "
                    f"momentum_masking={masking}, warmup={warmup}")


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
        loss = _loss_of(closure)
        for group, p in _stepped(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, frozen_at = group["lr"], group["eps"], group["freeze_after"]
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


class MomentumCorrectedAdamW(FrozenVarianceAdamW):
    """AdamW whose first moment travels compressed, for ``Compression(momentum=beta1, momentum_masking=False,
    warmup=(freeze_after, "dense"))``: each worker compresses its velocity u <- beta1 u + g (with error
    feedback) in g's place, so the gradient this optimizer receives is the average velocity u, and
    m = (1 - beta1) u is Adam's first moment (exactly so while the warm-up sends u uncompressed; there v learns
    from the gradient u_t - beta1 u_(t-1), and the step is AdamW's to rounding).

    At the freeze each parameter gets a gradient hook that divides every later gradient by the frozen
    denominator sqrt(v / (1 - beta2^f)) + eps before the Compression sees it, so that Top-k picks the
    coordinates of the largest *update*, not of the largest gradient (Adam moves a coordinate with small v
    far more per unit of gradient). The first moment restarts there: the hook's first output also takes
    away the ranks' average velocity, which this optimizer knows, so that the next average velocity is the
    divided gradient alone. (Carrying the velocity over, in the new units, put a whole dense first moment
    through Top-k at once; on the training experiment it ended below the restart at each of 4 seeds.) The
    step is then w <- w (1 - lr wd) - lr / (1 - beta1^t) (1 - beta1) u, without a division.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, freeze_after=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, freeze_after=freeze_after)
        for group in self.param_groups:   # the Compression checks at its first step that it matches
            group["first_moment_compressed"] = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = _loss_of(closure)
        for group, p in _stepped(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, frozen_at = group["lr"], group["eps"], group["freeze_after"]
            state = self.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p), velocity=torch.zeros_like(p))
            elif "velocity" not in state and "preconditioner" not in state:
                raise ValueError("MomentumCorrectedAdamW cannot continue from another optimizer's state (it "
                                 "has neither the previous velocity nor the frozen preconditioner)")
            state["step"] += 1
            step = float(state["step"])
            m, v, u = state["exp_avg"], state["exp_avg_sq"], p.grad
            m.copy_(u).mul_(1 - beta1)
            p.mul_(1 - lr * group["weight_decay"])
            if "preconditioner" in state:   # u arrived divided by the frozen denominator
                p.add_(m, alpha=-lr / (1 - beta1 ** step))
                continue
            g = u - beta1 * state["velocity"]   # the warm-up: AdamW
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
            if step < frozen_at:
                state["velocity"].copy_(u)
                continue
            del state["velocity"]   # the freeze
            state["preconditioner"] = denom.reciprocal_()
            # the restart: the ranks' velocities sum to n u, so -beta1 u added once on each rank makes their
            # next sum n d g
            state["pending"] = u.mul(-beta1)
            self._hook(p)
        return loss

    def _hook(self, p):
        hooks = self.__dict__.setdefault("_precondition_hooks", {})
        if id(p) not in hooks:
            def precondition(grad):
                state = self.state[p]
                out = grad * state["preconditioner"]
                pending = state.pop("pending", None)
                return out if pending is None else out.add_(pending)
            hooks[id(p)] = p.register_hook(precondition)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:   # a checkpoint taken after the freeze: its parameters are hooked
            for p in group["params"]:
                if "preconditioner" in self.state.get(p, {}):
                    self._hook(p)
