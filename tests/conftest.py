"""Test setup: 8 simulated CPU devices, set before JAX is imported."""
import os
import tempfile

# Sharding tests compare 1 device with 8; XLA reads this once, at backend start.
# XLA's backend optimisation level 0 cuts compile times (what dominates these tiny
# tests) by 2-4x on CPU; numerics stay float32 and every test compares within tolerance.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Caches the product keeps across runs (normalization statistics) go to a folder of this
# test session, never to the user's ~/.cache, where an entry of an earlier session could
# decide a test. Child processes inherit it.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='clusiam-test-cache-')


import pytest

# Loopback S3 and GCS servers, started by the first test that asks (tests/objstore.py);
# importing it also turns gcsfs's gRPC bucket probe off before anything imports gcsfs.
from tests.objstore import bucket, objstore  # noqa: F401


@pytest.fixture(scope='session')
def demo_tiles(tmp_path_factory):
    """The demo slide tiled as configs/demo.py tiles it (once per session, ~1 s): the
    demo's training data."""
    from clusiam_jax.slides import tiling
    from configs import demo
    tile = demo.get_config().tile
    out = str(tmp_path_factory.mktemp('demo_tiles'))
    tiling.tile_slides(tiling.list_slides(tile.slides), tiling.TileParams.from_config(tile),
                       out)
    return out
