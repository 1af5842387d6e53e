"""One training step: uint8 views -> (augment) -> normalize -> networks -> loss -> SGD -> EMA."""
import jax
import jax.numpy as jnp
import optax

from clusiam_jax import losses
from clusiam_jax.data.augment import AugmentConfig
from clusiam_jax.models import METHOD_SPECS, build_target_encoder
from clusiam_jax.models.preprocess import normalize_input
from clusiam_jax.train import device_augment
from clusiam_jax.train.optimizer import ema_update


def make_input_views(config, mean, std, dtype):
    if not config.data.augment_on_device:
        return lambda key, batch: [normalize_input(batch[name], mean, std, dtype)
                                   for name in ('view1', 'view2')]
    cfg = AugmentConfig.from_config(config)
    return lambda key, batch: [
        normalize_input(device_augment.augment_views(k, batch[name], cfg), mean, std, dtype)
        for k, name in zip(jax.random.split(key), ('view1', 'view2'))]


def apply_per_view(module, params, batch_stats, views):
    """`module` on each view in turn, threading BatchNorm statistics (docs/method.md §3):
    each view has its own batch statistics. Never concatenate the views into one batch."""
    outputs = []
    for x in views:
        out, mutated = module.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
        batch_stats = mutated['batch_stats']
        outputs.append(out)
    return outputs, batch_stats


def cluster_diagnostics(key, logits):
    """Collapse diagnostics over logits [N, K] for the step and the monitor (docs/method.md §6)."""
    k = logits.shape[-1]
    clean = jnp.argmax(logits, axis=-1)
    noisy = jnp.argmax(logits + losses.sample_gumbel(key, logits.shape), axis=-1)
    usage, noisy_usage = (jnp.sum(jax.nn.one_hot(a, k), axis=0) for a in (clean, noisy))
    freq = usage / logits.shape[0]
    entropy = -jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.where(freq > 0, freq, 1.0)), 0.0))
    return {'active_clusters': jnp.sum(usage > 0),
            'active_clusters_gumbel': jnp.sum(noisy_usage > 0),
            'gumbel_agreement': jnp.mean(clean == noisy), 'cluster_entropy': entropy}


def make_train_step(network, tx, config, mean, std, lr_schedule, ema_schedule):
    spec = METHOD_SPECS[network.method]
    target_encoder = build_target_encoder(network) if spec.has_target else None
    alpha = float(config.loss.alpha)
    input_views = make_input_views(config, mean, std, network.dtype)
    skip_nonfinite = config.train.on_nonfinite == 'skip'

    def step(state, batch):
        key = jax.random.fold_in(state.rng, state.step)
        # With JAX's (default) partitionable threefry the first two keys are those of
        # split(key): adding the augmentation key leaves the Gumbel draws as they were.
        gumbel_key, diagnostics_key, augment_key = jax.random.split(key, 3)
        views = input_views(augment_key, batch)
        if spec.has_target:
            # The target runs in training mode too and updates its own BN statistics.
            target_out, target_batch_stats = apply_per_view(
                target_encoder, state.target_params, state.target_batch_stats, views)
            targets = [jax.lax.stop_gradient(z) for _, z in target_out]
        else:
            target_batch_stats = state.target_batch_stats

        def loss_fn(params):
            (o1, o2), batch_stats = apply_per_view(network, params, state.batch_stats, views)
            if spec.has_target:
                invariance = losses.byol_invariance(o1['p'], o2['p'], targets[0], targets[1])
            else:
                invariance = losses.simsiam_invariance(o1['p'], o2['p'], o1['z'], o2['z'])
            aux = {'batch_stats': batch_stats, 'invariance': invariance}
            if spec.has_cluster_head:
                reps = jnp.concatenate([o1['z'], o2['z']], axis=0)
                logits = jnp.concatenate([o1['logits'], o2['logits']], axis=0)
                gumbel = losses.sample_gumbel(gumbel_key, logits.shape)
                similarity = losses.cluster_similarity(reps, logits, gumbel)
                aux.update(cluster=similarity, logits=logits)
                loss = (1.0 - alpha) * invariance + alpha * similarity
            else:
                loss = invariance  # alpha is 0 without a cluster head (config check)
            return loss, aux
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Weighted parts, as the original logs them: loss = invariance + cluster.
        metrics = {'loss': loss, 'invariance': (1.0 - alpha) * aux['invariance'],
                   'lr': lr_schedule(state.step),
                   # A NaN/Inf gradient shows here the step it happens (the loop checks).
                   'grad_norm': optax.tree.norm(grads)}
        if spec.has_target:
            momentum = ema_schedule(state.step)
            target_params = ema_update(state.target_params, params['encoder'], momentum)
            metrics['ema_momentum'] = momentum
        else:
            target_params = state.target_params
        if spec.has_cluster_head:
            metrics['cluster'] = alpha * aux['cluster']
            metrics['cluster_similarity'] = aux['cluster']
            metrics.update(cluster_diagnostics(diagnostics_key, aux['logits']))
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=aux['batch_stats'], opt_state=opt_state,
                                  target_params=target_params,
                                  target_batch_stats=target_batch_stats)
        if skip_nonfinite:
            # Old floats, advanced counters: data, noise and schedules stay tied to the step.
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old) if
                                     jnp.issubdtype(new.dtype, jnp.floating) else new,
                                     new_state, state)
            metrics['skipped'] = jnp.where(finite, 0.0, 1.0)
        return new_state, metrics

    return step
