"""Architectures: docs/method.md §2 parameter counts, torchvision layout and PyTorch-style init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusiam_jax.models import SSLNetwork
from clusiam_jax.models.resnet import ResNet18, ResNet50

# docs/method.md §2. The projector's last bias is frozen in the original and dropped here.
PAPER_COUNTS = {
    'clusiam': dict(D=2048, hidden=512, backbone=11_176_512, projector=1_576_960,
                    predictor=2_100_224, cluster_projector=1_050_112, assigner=51_300),
    'clubyol': dict(D=256, hidden=4096, backbone=11_176_512, projector=657_664,
                    predictor=2_109_696, cluster_projector=66_304, assigner=25_700),
}


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(module, image_size=64, **kwargs):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              jnp.zeros((2, image_size, image_size, 3)),
                                              train=True, **kwargs))


@pytest.mark.parametrize('method', ['clusiam', 'clubyol'])
def test_parameter_counts_match_spec(method):
    want = PAPER_COUNTS[method]
    net = SSLNetwork(method, feat_size=want['D'], pred_hidden=want['hidden'])
    params = abstract_variables(net)['params']
    head = params['cluster_head']
    assert count(params['encoder']['backbone']) == want['backbone']
    assert count(params['encoder']['projector']) + want['D'] == want['projector']
    assert count(params['predictor']) == want['predictor']
    cluster_projector = count(head['projector_linear']) + count(head['projector_bn'])
    assert cluster_projector == want['cluster_projector']
    assert count(head['assigner']) == want['assigner']


@pytest.mark.parametrize('method', ['simsiam', 'byol'])
def test_baselines_have_no_cluster_head(method):
    net = SSLNetwork(method, feat_size=256, pred_hidden=4096)
    assert 'cluster_head' not in abstract_variables(net)['params']


def test_resnet50_matches_torchvision_count():
    # torchvision resnet50 has 25,557,032 parameters, 2,049,000 of them in fc.
    assert count(abstract_variables(ResNet50())['params']) == 25_557_032 - 2_049_000


def test_torchvision_spatial_layout():
    """Explicit paddings: 224 -> 112 (stem) -> 56 (pool) -> 56/28/14/7 as in torchvision."""
    _, state = jax.eval_shape(lambda: ResNet18().init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False,
        capture_intermediates=True))
    inter = state['intermediates']
    assert inter['conv1']['__call__'][0].shape == (1, 112, 112, 64)
    for stage, size in zip(range(1, 5), (56, 28, 14, 7)):
        block = inter[f'layer{stage}_1']['__call__'][0]
        assert block.shape[1:3] == (size, size)
    assert inter['__call__'][0].shape == (1, 512)


def test_outputs_and_inference_mode():
    net = SSLNetwork('clubyol', backbone='resnet_tiny', feat_size=16, pred_hidden=32,
                     num_clusters=5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = jax.jit(net.init, static_argnames='train')(jax.random.PRNGKey(0), x, train=True)
    infer = jax.jit(lambda v, x: net.apply(v, x, train=False))
    out = infer(variables, x)
    assert out['features'].shape == (4, 64) and out['z'].shape == (4, 16)
    assert out['p'].shape == (4, 16) and out['logits'].shape == (4, 5)
    # Inference mode uses running statistics: no batch dependence between samples.
    single = infer(variables, x[:1])
    np.testing.assert_allclose(single['features'], out['features'][:1], rtol=1e-5, atol=1e-6)


def test_init_follows_pytorch():
    init = jax.jit(SSLNetwork('clusiam').init, static_argnames='train')
    params = init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=True)['params']
    backbone = params['encoder']['backbone']
    # Zero-init residual: the last BN scale of every block is 0, the others 1.
    for name, block in backbone.items():
        if name.startswith('layer'):
            assert np.all(block['bn2']['scale'] == 0) and np.all(block['bn1']['scale'] == 1)
    # He normal, fan_out: std = sqrt(2 / (k * k * out_channels)).
    kernel = np.asarray(backbone['layer4_1']['conv1']['kernel'])  # 3x3x512x512
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 512)), rtol=0.01)
    assert abs(kernel.mean()) < 0.01 * kernel.std()  # zero-mean, 2.4M samples
    # torch.nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    linear = params['predictor']['linear2']
    bound = 1 / np.sqrt(512)
    for leaf in (linear['kernel'], linear['bias']):
        leaf = np.asarray(leaf)
        assert leaf.min() >= -bound and leaf.max() <= bound
        assert leaf.max() > 0.95 * bound and leaf.min() < -0.95 * bound
    np.testing.assert_allclose(np.asarray(linear['kernel']).std(), bound / np.sqrt(3), rtol=0.01)
