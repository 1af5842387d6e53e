"""SGD with PyTorch-style coupled weight decay (decay before the momentum buffer, unlike
AdamW) and the original's per-epoch schedules; LARS with warmup as a pod-scale option."""
import jax
import jax.numpy as jnp
import optax


def initial_lr(config) -> float:
    """lr = base_lr * batch_size / 256 (linear scaling rule, docs/method.md §5)."""
    return config.optim.base_lr * config.train.batch_size / 256


def per_epoch_cosine(init_lr: float, steps_per_epoch: int, num_epochs: int, warmup_epochs: int = 0):
    """lr * 0.5 * (1 + cos(pi * e / epochs)), constant within epoch e (docs/method.md §5);
    with warmup (as BYOL), a linear ramp per step first, then the cosine over the rest."""
    warmup_steps = warmup_epochs * steps_per_epoch
    decay_epochs = max(num_epochs - warmup_epochs, 1)

    def schedule(step):
        step = jnp.asarray(step)
        epoch = (step - warmup_steps) // steps_per_epoch
        cosine = init_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / decay_epochs))
        if warmup_steps == 0:
            return cosine
        return jnp.where(step < warmup_steps, init_lr * (step + 1) / warmup_steps, cosine)
    return schedule


def coupled_sgd(learning_rate, weight_decay: float, momentum: float):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum, nesterov=False),
                       optax.scale_by_learning_rate(learning_rate))


def base_optimizer(config, learning_rate):
    """optim.name: 'sgd' or 'lars' (kernels get weight decay and trust ratio, 1-d leaves not)."""
    opt = config.optim
    if opt.name == 'lars':
        is_matrix = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
        return optax.lars(learning_rate, weight_decay=opt.weight_decay,
                          weight_decay_mask=is_matrix, trust_ratio_mask=is_matrix,
                          momentum=opt.momentum)
    return coupled_sgd(learning_rate, opt.weight_decay, opt.momentum)


def make_optimizer(config, steps_per_epoch: int):
    lr = initial_lr(config)
    schedule = per_epoch_cosine(lr, steps_per_epoch, config.train.num_epochs,
                                config.optim.warmup_epochs)
    scheduled = base_optimizer(config, schedule)
    if not config.optim.fix_pred_lr:
        return scheduled, schedule
    labels = lambda params: {n: jax.tree.map(
        lambda _, n=n: 'fixed' if n == 'predictor' else 'scheduled', sub)
        for n, sub in params.items()}
    return optax.multi_transform({'scheduled': scheduled, 'fixed': base_optimizer(config, lr)},
                                 labels), schedule


def ema_momentum(config, total_steps: int):
    """Target momentum: constant (original) or BYOL's cosine m0 -> 1 (ema.schedule)."""
    m0 = config.ema.momentum
    if config.ema.schedule == 'cosine':
        return lambda step: 1.0 - (1.0 - m0) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total_steps))
    return lambda step: jnp.asarray(m0, jnp.float32)


def ema_update(target, online, momentum):
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)
