"""SGD with PyTorch-style coupled weight decay and the original's per-epoch schedules.

PyTorch's SGD does d = g + wd * p; buf = momentum * buf + d; p -= lr * buf. In optax
that is add_decayed_weights -> trace -> scale by -lr, in this order (decay before the
momentum buffer, unlike AdamW-style decoupled decay).
"""

import jax
import jax.numpy as jnp
import optax


def initial_lr(config) -> float:
    """lr = base_lr * batch_size / 256 (linear scaling rule, SPEC s5)."""
    return config.optim.base_lr * config.train.batch_size / 256


def per_epoch_cosine(init_lr: float, steps_per_epoch: int, num_epochs: int):
    """lr_e = lr * 0.5 * (1 + cos(pi * e / epochs)), constant within epoch e."""
    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        return init_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
    return schedule


def coupled_sgd(learning_rate, weight_decay: float, momentum: float):
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def predictor_labels(params):
    """'fixed' for the predictor's leaves, 'scheduled' for everything else."""
    return {name: jax.tree.map(lambda _: 'fixed' if name == 'predictor' else 'scheduled', sub)
            for name, sub in params.items()}


def make_optimizer(config, steps_per_epoch: int):
    """Returns (optax transformation, lr schedule of the scheduled groups)."""
    lr = initial_lr(config)
    schedule = per_epoch_cosine(lr, steps_per_epoch, config.train.num_epochs)
    opt = config.optim
    scheduled = coupled_sgd(schedule, opt.weight_decay, opt.momentum)
    if not opt.fix_pred_lr:
        return scheduled, schedule
    fixed = coupled_sgd(lr, opt.weight_decay, opt.momentum)
    return optax.multi_transform({'scheduled': scheduled, 'fixed': fixed},
                                 predictor_labels), schedule


def ema_momentum(config, total_steps: int):
    """Target momentum at a step: constant (original) or BYOL's cosine m0 -> 1."""
    m0 = config.ema.momentum
    if config.ema.schedule == 'constant':
        return lambda step: jnp.asarray(m0, jnp.float32)
    if config.ema.schedule == 'cosine':
        return lambda step: 1.0 - (1.0 - m0) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total_steps))
    raise ValueError(f"ema.schedule must be 'constant' or 'cosine', got {config.ema.schedule!r}")


def ema_update(target, online, momentum):
    """target = m * target + (1 - m) * online, leaf by leaf (parameters only)."""
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)
