r"""Parity with PyTorch at the paper's sizes, as JSON lines for the README (needs
requirements-torch.txt).

  python -m bench.experiments.torch_parity [--image-size 224] [--batch 8]
      [--step-image-size 64] [--step-batch 8] [--skip-step | --only-step]
      [--methods clusiam,clubyol]

tests/test_torch_parity.py checks the same things on tiny networks; this runs them on
the real ResNet-18 and heads, where float32 rounding has more room to add up, and
reports the sizes of the differences instead of asserting bounds. The reference is
tests/torch_reference.py (the original's model, loss and SGD step).

Each line: {"check": ..., "method": ..., <max abs differences or relative errors>}.
- inference: an original-format model (torchvision ResNet-18 + SPEC heads, BatchNorm
  statistics randomized) imported into ours; features / z / p / logits in eval mode.
- export: ours -> safetensors -> torchvision resnet18 (fc = Identity, strict load).
- cluster_similarity: S and dS/dlogits at the paper's sizes (2B = 1024, K = 100).
- train_step: SGD steps of the training loop's own step (build_trainer) from the same
  weights, batch and Gumbel noise; the error of ours and of PyTorch float32 against
  PyTorch float64, relative to each tensor's update.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

from bench.common import MEAN, STD, bench_trainer
from clusiam_jax import losses, parallel
from clusiam_jax.interop import from_torch, to_torch
from clusiam_jax.models import build_network
from clusiam_jax.state import state_from_weights
from tests import torch_reference as ref

PAPER = {'clusiam': dict(feat_size=2048, pred_hidden=512, num_clusters=100),
         'clubyol': dict(feat_size=256, pred_hidden=4096, num_clusters=100)}


def emit(**record):
    print(json.dumps(record), flush=True)


def diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def reference(method, seed=0):
    torch.manual_seed(seed)
    return ref.randomize_(ref.ReferenceNetwork(method, 'resnet18', **PAPER[method]), seed)


def check_inference(method, image_size, batch):
    model = reference(method).eval()
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    config, state = from_torch.import_state_dict(state_dict, method)
    x = np.random.RandomState(0).randn(batch, image_size, image_size, 3).astype(np.float32)
    with jax.default_matmul_precision('highest'):
        ours = build_network(config.model).apply(state.online_variables,
                                                 jnp.asarray(x), train=False)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = model.view(xt)
    emit(check='inference', method=method, image_size=image_size, batch=batch,
         **{f'max_abs_{k}': diff(ours[k], theirs[k].numpy())
            for k in ('features', 'z', 'p', 'logits')})

    # Export round trip: ours -> safetensors -> torchvision.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'backbone.safetensors')
        to_torch.save_state_dict(to_torch.backbone_state_dict(
            jax.device_get(state.params['encoder']),
            jax.device_get(state.batch_stats['encoder'])), path)
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()
        net.load_state_dict(load_file(path), strict=True)
        with torch.no_grad():
            exported = net.eval()(xt).numpy()
    emit(check='export', method=method, strict_load=True,
         max_abs_features=diff(ours['features'], exported))


def check_cluster_similarity(seed=0, n=1024, d=2048, k=100):
    rng = np.random.RandomState(seed)
    reps = rng.randn(n, d).astype(np.float32)
    logits = rng.randn(n, k).astype(np.float32)
    gumbel = rng.gumbel(size=(n, k)).astype(np.float32)
    with jax.default_matmul_precision('highest'):
        value, grad = jax.value_and_grad(losses.cluster_similarity, argnums=1)(
            jnp.asarray(reps), jnp.asarray(logits), jnp.asarray(gumbel))
    t_logits = torch.tensor(logits, requires_grad=True)
    t_value = ref.cluster_similarity(torch.tensor(reps), t_logits, torch.tensor(gumbel))
    t_value.backward()
    emit(check='cluster_similarity', rows=n, dim=d, clusters=k, value=float(value),
         abs_diff_value=abs(float(value) - t_value.item()),
         max_abs_diff_grad=diff(grad, t_logits.grad.numpy()))


def _torch_view(x_uint8, dtype):
    x = (x_uint8.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def _step_reference(method):
    model = reference(method, seed=1)
    with torch.no_grad():
        model.encoder.fc[6].bias.zero_()   # frozen; zero keeps running means comparable
        if method == 'clubyol':
            model.target_encoder.load_state_dict(model.encoder.state_dict())
    return model


def check_train_step(method, image_size, batch, steps=2, init_lr=1e-3):
    start = {k: v.numpy().astype(np.float64)
             for k, v in _step_reference(method).state_dict().items()
             if not k.endswith('num_batches_tracked')}
    config, weights = from_torch.import_state_dict(
        {k: v.astype(np.float32) for k, v in start.items()}, method)
    config.train.batch_size, config.train.num_epochs = batch, steps
    config.optim.base_lr = init_lr * 256 / batch
    # steps_per_epoch=1: each step is one of the reference's epochs (its lr is set per
    # epoch). trainer.step is the loop's jitted step, with its shardings and compiler options.
    trainer = bench_trainer(config, steps_per_epoch=1, mean=MEAN, std=STD)
    step = trainer.step
    # Placed as the step returns it, so the second step reuses the first one's compilation
    # (and jax_step_s times the step, not a recompile).
    state = state_from_weights(weights, trainer.tx, config.train.seed)
    state = jax.device_put(state, parallel.replicated(trainer.mesh))
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = _step_reference(method).to(dtype)
        runs[dtype] = (model, ref.make_sgd(model, init_lr, config.optim.momentum,
                                           config.optim.weight_decay, config.optim.fix_pred_lr))
    rng = np.random.RandomState(0)
    for i in range(steps):
        views = [rng.randint(0, 256, (batch, image_size, image_size, 3), np.uint8)
                 for _ in range(2)]
        key = jax.random.fold_in(state.rng, state.step)
        gumbel = np.array(losses.sample_gumbel(jax.random.split(key)[0],
                                               (2 * batch, config.model.num_clusters)))
        t0 = time.perf_counter()
        with jax.default_matmul_precision('highest'):
            state, metrics = step(state, {'view1': jnp.asarray(views[0]),
                                          'view2': jnp.asarray(views[1])})
        ours_loss = float(metrics['loss'])
        jax_s = time.perf_counter() - t0
        losses_t = {}
        for dtype, (model, optimizer) in runs.items():
            ref.set_epoch_lr(optimizer, init_lr, i, steps)
            losses_t[dtype] = ref.train_step(
                model, optimizer, _torch_view(views[0], dtype), _torch_view(views[1], dtype),
                torch.from_numpy(gumbel).to(dtype), config.loss.alpha,
                config.ema.momentum)['loss']
        ours = to_torch.network_state_dict(*jax.device_get(
            (state.params, state.batch_stats, state.target_params, state.target_batch_stats)))
        w32, w64 = ({k: v.double().numpy() for k, v in runs[d][0].state_dict().items()}
                    for d in (torch.float32, torch.float64))

        def worst(a, b):
            """The worst tensor's |a - b| / |b - start|: error relative to b's update."""
            # The EMA target moves by 1% of an update, below float32 resolution here:
            # it is reported in absolute terms (max_abs_target_diff_*) instead.
            ratios = {k: np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k] - start[k])
                      for k in start if np.linalg.norm(b[k] - start[k]) > 0
                      and not k.startswith('target_encoder.')}
            key = max(ratios, key=ratios.get)
            return [float(ratios[key]), key]

        emit(check='train_step', method=method, step=i + 1, image_size=image_size,
             batch=batch, lr=init_lr,
             loss_abs_diff_vs_torch32=abs(ours_loss - losses_t[torch.float32]),
             max_abs_param_diff_vs_torch32=max(diff(ours[k], w32[k]) for k in start),
             rel_update_diff_vs_torch32=worst(ours, w32),
             rel_update_error_ours_vs_torch64=worst(ours, w64),
             rel_update_error_torch32_vs_torch64=worst(w32, w64),
             **({'max_abs_target_diff_vs_torch32': max(
                    diff(ours[k], w32[k]) for k in start if k.startswith('target_encoder.')),
                 'max_abs_target_diff_torch32_vs_torch64': max(
                    diff(w32[k], w64[k]) for k in start if k.startswith('target_encoder.'))}
                if method == 'clubyol' else {}),
             jax_step_s=round(jax_s, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--step-image-size', type=int, default=64)
    parser.add_argument('--step-batch', type=int, default=8)
    parser.add_argument('--skip-step', action='store_true')
    parser.add_argument('--only-step', action='store_true')
    parser.add_argument('--methods', default='clusiam,clubyol')
    args = parser.parse_args()
    emit(check='versions', jax=jax.__version__, torch=torch.__version__,
         torchvision=torchvision.__version__, backend=jax.default_backend())
    methods = args.methods.split(',')
    if not args.only_step:
        for method in methods:
            check_inference(method, args.image_size, args.batch)
        check_cluster_similarity()
    if not args.skip_step:
        for method in methods:
            check_train_step(method, args.step_image_size, args.step_batch)


if __name__ == '__main__':
    main()
