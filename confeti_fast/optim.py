"""Optimizer, learning-rate schedule and the EMA teacher update (docs/method.md §3 steps 1 and 10)."""
import torch


def build_optimizer(backbone_params, head_params, opt_cfg, fused=False):
    """AdamW with two groups: the backbone at lr, heads and reg_proj at lr x head_lr_mult.
    `fused`: one kernel for the whole update (the CUDA default, see runtime.py)."""
    lr = opt_cfg["lr"]
    return torch.optim.AdamW(
        [{"params": list(backbone_params), "lr": lr, "base_lr": lr},
         {"params": list(head_params), "lr": lr * opt_cfg["head_lr_mult"], "base_lr": lr * opt_cfg["head_lr_mult"]}],
        lr=lr, betas=tuple(opt_cfg["betas"]), weight_decay=opt_cfg["weight_decay"], fused=fused or None,
    )


def lr_at(base_lr, t, max_iters, warmup_iters, warmup_ratio=1e-6, power=1.0):
    """mmcv's poly schedule with linear warm-up: poly decay to 0 over `max_iters`, and during
    the first `warmup_iters` that rate scaled from `warmup_ratio` up to 1."""
    regular = base_lr * (1.0 - t / max_iters) ** power
    if t < warmup_iters:
        k = (1.0 - t / warmup_iters) * (1.0 - warmup_ratio)
        return regular * (1.0 - k)
    return regular


def set_lr(optimizer, t, max_iters, opt_cfg):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(group["base_lr"], t, max_iters, opt_cfg["warmup_iters"],
                            opt_cfg["warmup_ratio"], opt_cfg["power"])


def ema_alpha(t, momentum=0.999):
    """Teacher EMA weight at iteration t: min(1 - 1/(t+1), momentum)."""
    return min(1.0 - 1.0 / (t + 1), momentum)


@torch.no_grad()
def update_teacher(teacher, student, t, momentum=0.999):
    """p' = a p' + (1 - a) p over the parameters (not BN buffers, as in DAFormer); copy at t = 0.
    One multi-tensor op per stage instead of ~660 per-parameter launches."""
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if t == 0:
        torch._foreach_copy_(teacher_params, student_params)
        return
    alpha = ema_alpha(t, momentum)
    torch._foreach_mul_(teacher_params, alpha)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)


@torch.no_grad()
def copy_state(destination, source):
    """Copy `source`'s parameters and buffers into `destination` (same architecture) in place."""
    torch._foreach_copy_(list(destination.parameters()) + list(destination.buffers()),
                         list(source.parameters()) + list(source.buffers()))
