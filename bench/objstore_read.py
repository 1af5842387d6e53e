"""Augmented pairs/s and CPU ms per pair of one worker reading the same patches of a slide
from local disk, from a bucket directly, and from the bucket behind a proxy that adds a
bucket's latency to every request (issue 25):

    python -m bench.objstore_read [--pairs 300] [--read-ahead 8 32 64] [--chunk 8]
        [--delays 0.02 0.05] [--slide PATH] [--rounds 2]

One JSON line per setting: pairs_per_s, cpu_ms_per_pair (this process: read, decode and two
augmented 224 px views; the server and the proxy run as processes of their own and are
reported apart), requests, bytes and fetch calls per pair (storage.telemetry; the proxy's
own count of HTTP requests), requests in flight (ranges per fetch call), max RSS and RSS at
10% and at the end of the setting, the load average (other agents share this machine), and
the ratio to the local-disk setting of the same round. Then one line per bucket endpoint
with the CPU cost of the path layer alone (storage.read_ranges of the same tiles, no decode).

The read path is training's: locally slides/reader.open_slide (OpenSlide's check, then the
direct TIFF reads of slides/tiles.py); from the bucket slides/remote_tiles.RemoteTiles over
storage.read_ranges, with the slide's tile index (slides/tile_index.py) written to the bucket
and read back as the tiling job leaves it. Each patch is a random level-0 224 px square
(seeded, the same squares in every setting, checked bit-equal to the local read), then
data.augment.two_views. Read-ahead 1: one patch, one fetch of its ~3.5 tiles, then the
next (a worker without read-ahead); read-ahead K keeps the next K patches being read,
--chunk of them per RemoteTiles.read_regions call (one storage.read_ranges), K / chunk calls
at once on background threads, while this thread augments (what would hide the latency).
Requests in flight: ranges per call times calls at once.

The bucket is fake-gcs-server (memory backend) on loopback, started as tests/objstore.py
starts it; the proxy is bench/objstore_proxy.py's FaultProxy in its own process. moto is
not used: it serves each ranged GET of a large object in about 30 ms on its own
(research notes), which would measure moto. The slide is a synthetic JPEG pyramid written
with tifffile into a temporary folder (or --slide): never committed.
"""
import argparse
import concurrent.futures
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

# gcsfs reads this at import: no gRPC bucket-type probe against an emulator (60 s a call).
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from bench.common import command_line, emit, process_tree_cpu_s, process_tree_rss_bytes
from bench.data_pipeline import machine

PATCH = 224
TILE = 256


def write_pyramid(path: str, side: int) -> None:
    """An SVS-like pyramid (tiled JPEG, 256 px tiles, levels /1 /4 /16), tiles of varied
    content so neighbouring tiles are different bytes."""
    import tifffile
    rng = np.random.default_rng(0)
    base = (np.linspace(0, 200, TILE)[:, None, None]
            + rng.integers(0, 24, (TILE, TILE, 3))).astype(np.uint8)

    def tiles(n):
        for i in range((n // TILE) ** 2):
            yield np.roll(base, (i * 7) % TILE, axis=1)

    with tifffile.TiffWriter(path) as w:
        for lvl, ds in enumerate((1, 4, 16)):
            n = side // ds
            w.write(tiles(n), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE),
                    compression='jpeg', photometric='rgb', subfiletype=0 if lvl == 0 else 1,
                    description=(f'Aperio Image Library synthetic\n{n}x{n} |AppMag = 40|'
                                 'MPP = 0.25') if lvl == 0 else None)


def rss_bytes() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CountingReads:
    """storage.read_ranges, counting calls and the ranges of each (requests in flight)."""

    def __init__(self):
        from clusiam_jax import storage
        self._read = storage.read_ranges
        self.sizes = []

    def __call__(self, path, ranges):
        self.sizes.append(len(ranges))
        return self._read(path, ranges)


def run_setting(read_chunk, positions, read_ahead: int, chunk: int, cfg, seed: int) -> dict:
    """Reads and augments every position in order; read_chunk([(x, y), ...]) -> [patch].
    read_ahead 1: one patch read, then augmented (a grain worker today). read_ahead K: the
    next K patches are being read, `chunk` per fetch call on K / chunk threads, while this
    thread augments."""
    import collections

    from clusiam_jax.data import augment
    rng = np.random.default_rng(seed)
    size = 1 if read_ahead == 1 else chunk
    chunks = [positions[i:i + size] for i in range(0, len(positions), size)]
    depth = max(1, read_ahead // size)
    rss_10 = None
    tenth = max(1, len(positions) // 10)
    done = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if read_ahead == 1:
        for part in chunks:
            for patch in read_chunk(part):
                augment.two_views(patch, rng, cfg)
                done += 1
                if done == tenth:
                    rss_10 = rss_bytes()
    else:
        with concurrent.futures.ThreadPoolExecutor(depth) as pool:
            pending = collections.deque(pool.submit(read_chunk, c) for c in chunks[:depth])
            following = iter(chunks[depth:])
            while pending:
                patches = pending.popleft().result()
                nxt = next(following, None)
                if nxt is not None:
                    pending.append(pool.submit(read_chunk, nxt))
                for patch in patches:
                    augment.two_views(patch, rng, cfg)
                    done += 1
                    if done == tenth:
                        rss_10 = rss_bytes()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return dict(pairs=done, seconds=round(wall, 3), pairs_per_s=round(done / wall, 1),
                cpu_ms_per_pair=round(1000 * cpu / done, 3),
                pairs_per_cpu_s=round(done / cpu, 1),
                fetches_in_flight=depth if read_ahead > 1 else 1,
                rss_mb_at_10pct=round((rss_10 or 0) / 2**20, 1),
                rss_mb_end=round(rss_bytes() / 2**20, 1),
                max_rss_mb=round(max_rss_bytes() / 2**20, 1))


SHARED_SLIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..',
                            'shared', 'data', 'slides', 'cmu-1-small-region.svs')


def prepare_loader_data(workdir: str, copies: int, bucket: str):
    """`copies` copies of the shared CC0 slide, tiled at 224 px (0.5 µm/px) on local disk and,
    from a copy of the folder in the bucket, into the bucket (coords and tile indexes, as
    --mode tile leaves them), and the packed dataset of the local tiling built into the
    bucket (--mode build_dataset --out gs://...). Returns (local tiling, bucket tiling,
    bucket dataset); None where the shared slide is absent."""
    from clusiam_jax import storage
    from clusiam_jax.config import default_config
    from clusiam_jax.data import tfds_builder
    from clusiam_jax.slides import tiling
    if not os.path.isfile(SHARED_SLIDE):
        return None
    wsi = os.path.join(workdir, 'wsi')
    os.makedirs(wsi)
    for i in range(copies):
        shutil.copyfile(SHARED_SLIDE, os.path.join(wsi, f'copy{i:03d}.svs'))
    tile = default_config().tile
    tile.patch_size = PATCH
    params = tiling.TileParams.from_config(tile)
    local_tiles = os.path.join(workdir, 'tiles')
    tiling.tile_slides(tiling.list_slides(wsi), params, local_tiles)
    storage.upload(wsi, f'{bucket}/wsi', recursive=True)
    bucket_tiles = f'{bucket}/tiles'
    tiling.tile_slides(tiling.list_slides(f'{bucket}/wsi'), params, bucket_tiles)
    with contextlib.redirect_stdout(sys.stderr):   # tfds prints its progress on stdout
        packed = tfds_builder.build_dataset(local_tiles, f'{bucket}/packed')
    return local_tiles, bucket_tiles, packed


def reader_rss_bytes(me: int) -> int:
    """RSS of this process and its children but the server and the proxy (processes of
    their own here; fake-gcs-server holds the bucket in memory)."""
    total = process_tree_rss_bytes(me)
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                cmd = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(')') + 2:].split()[1]) == me and (
                b'fake-gcs-server' in cmd or b'objstore_proxy' in cmd):
            total -= process_tree_rss_bytes(int(entry))
    return total


def time_loader(data_path: str, batches: int, batch_size: int, workers: int, seed: int,
                cache_dir: str, others) -> dict:
    """The training loader (data.create_train_loader: the source, grain, two_views) on
    `data_path`: pairs/s and CPU per pair over `batches` batches after 2 warm-up batches;
    others() -> CPU seconds of this process's children that are no reader (server, proxy)."""
    from bench.common import MEAN, STD
    from clusiam_jax import data, storage
    from clusiam_jax.config import default_config
    config = default_config()
    d = config.data
    d.path, d.image_size, d.num_workers, d.mean, d.std = data_path, PATCH, workers, MEAN, STD
    if 'cache_dir' in d:
        d.cache_dir = cache_dir
    config.train.batch_size, config.train.seed, config.train.num_epochs = batch_size, seed, 50
    loader = data.create_train_loader(config)
    it = loader.iterator()
    warm = 2
    for _ in range(warm):
        next(it)
    it.take_input_counts()   # the warm-up's reads are not counted
    me = os.getpid()
    cpu0, others0 = process_tree_cpu_s(me), others()
    wall0, rss = time.perf_counter(), []
    for _ in range(batches):
        next(it)
        rss.append(reader_rss_bytes(me))
    wall = time.perf_counter() - wall0
    cpu = process_tree_cpu_s(me) - cpu0 - (others() - others0)
    counts = it.take_input_counts()
    it.close()
    pairs = batches * batch_size
    out = dict(pairs=pairs, seconds=round(wall, 3), pairs_per_s=round(pairs / wall, 1),
               cpu_ms_per_pair=round(1000 * cpu / pairs, 3),
               pairs_per_cpu_s=round(pairs / cpu, 1), records=len(loader.source),
               rss_mb_at_10pct=round(rss[max(0, len(rss) // 10 - 1)] / 2**20, 1),
               rss_mb_end=round(rss[-1] / 2**20, 1),   # this process and its grain workers
               max_rss_mb_main=round(max_rss_bytes() / 2**20, 1))
    if counts is not None:
        t = storage.Telemetry.summary(counts, slides=True)
        out.update(requests_per_pair=round(t['requests'] / pairs, 2),
                   kb_per_pair=round(t['bytes'] / pairs / 1024, 1),
                   fetch_latency_mean_ms=round(t['latency_mean_ms'], 1),
                   fetch_latency_p99_ms=round(t['latency_p99_ms'], 1),
                   retries=t['retries'], errors=t['errors'])
    return out


def start_server(workdir: str):
    from tests import objstore
    binary = objstore.fake_gcs_binary()
    if binary is None:
        raise SystemExit('no fake-gcs-server binary on this platform (linux x86_64 only)')
    log = open(os.path.join(workdir, 'fake-gcs.log'), 'ab')
    proc, url = objstore.start_fake_gcs(log, binary)
    return proc, url, log


def route(endpoint: str) -> None:
    """Send this process's gs:// traffic to `endpoint` (the server or a proxy)."""
    from tests import objstore
    os.environ.update(objstore.env_for('gs', endpoint))
    objstore.clear_fs_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=300, help='augmented pairs per setting')
    parser.add_argument('--read-ahead', type=int, nargs='+', default=[8, 32, 64],
                        help='patches per fetch besides 1 (one fetch per patch, as today)')
    parser.add_argument('--chunk', type=int, default=8,
                        help='patches per fetch call under read-ahead (K / chunk calls at once)')
    parser.add_argument('--delays', type=float, nargs='+', default=[0.02, 0.05],
                        help='seconds the proxy adds per request')
    parser.add_argument('--slide', help='a TIFF-family slide (default: a synthetic pyramid)')
    parser.add_argument('--side', type=int, default=16384, help='synthetic level-0 side, px')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--loader-copies', type=int, default=16,
                        help='copies of the shared CC0 slide for the train-loader settings '
                             '(0: skip them)')
    parser.add_argument('--loader-batches', type=int, default=10, help='timed batches of 32')
    parser.add_argument('--loader-workers', type=int, default=0, help='data.num_workers')
    args = parser.parse_args()

    import cv2
    import imagecodecs

    from bench import objstore_proxy
    from clusiam_jax import storage
    from clusiam_jax.data import augment
    from clusiam_jax.slides import reader, remote_tiles, tile_index
    from tests import objstore

    workdir = tempfile.mkdtemp(prefix='clusiam-objstore-bench-')
    server = log = None
    try:
        path = args.slide
        if path is None:
            path = os.path.join(workdir, 'synthetic.svs')
            write_pyramid(path, args.side)
        server, server_url, log = start_server(workdir)
        route(server_url)
        # The bucket as the tiling job leaves it: the slide and its tile index.
        bucket = 'gs://bench-objstore'
        import fsspec
        fsspec.filesystem('gs', endpoint_url=server_url, token='anon').mkdir(bucket[5:])
        slide_url = f'{bucket}/slides/{os.path.basename(path)}'
        storage.upload(path, slide_url)
        with open(path, 'rb') as f:
            index = tile_index.build(f, name=path)
        index_url = tile_index.index_file(f'{bucket}/tiling', 'slide')
        tile_index.write(index_url, index)
        size = os.path.getsize(path)

        local = reader.open_slide(path)
        if local.tiles is None or local.levels[0].backend is not local.tiles:
            raise SystemExit(f'{path}: level 0 is not read by the direct TIFF reader')
        width, height = local.dimensions
        rng = np.random.default_rng(args.seed)
        positions = [(int(x), int(y)) for x, y in zip(
            rng.integers(0, width - PATCH, args.pairs), rng.integers(0, height - PATCH,
                                                                   args.pairs))]
        cfg = augment.AugmentConfig(image_size=PATCH)
        base = dict(bench='objstore_read', slide=os.path.basename(path) if args.slide
                    else f'synthetic JPEG pyramid {args.side} px, 256 px tiles',
                    slide_mb=round(size / 2**20, 1), patch=PATCH,
                    patches='uniform random level-0 squares (seeded), one per pair',
                    store='fake-gcs-server 127.0.0.1 (memory backend), gcsfs',
                    machine=machine(), imagecodecs=imagecodecs.__version__,
                    opencv=cv2.__version__, command=command_line())

        def local_chunk(chunk):
            return [local.read(0, x, y, PATCH, PATCH) for x, y in chunk]

        def remote_backend(counting):
            idx = tile_index.read(index_url, size)   # one GET, as each worker does
            return remote_tiles.RemoteTiles(idx, slide_url, counting)

        # The remote read is the local read, bit for bit (a few squares).
        check = remote_backend(storage.read_ranges)
        for x, y in positions[:8]:
            if not np.array_equal(check.read(0, x, y, PATCH, PATCH),
                                  local.read(0, x, y, PATCH, PATCH)):
                raise SystemExit(f'remote read at {(x, y)} differs from the local read')
        check.close()

        def measure(name, endpoint, delay, read_ahead, proxy_url=None):
            counting = CountingReads()
            backend = remote_backend(counting) if endpoint else None
            if endpoint:   # warm: connections open, as in a running epoch
                backend.read_regions([(0, 0, 0, 8, 8)])
                backend.close()
            counting.sizes.clear()
            if proxy_url:
                objstore_proxy.control(proxy_url, 'reset')
            storage.telemetry.take()
            load0 = os.getloadavg()
            server_cpu0 = process_tree_cpu_s(server.pid)
            if endpoint:
                def chunk_reader(chunk):
                    return backend.read_regions([(0, x, y, PATCH, PATCH) for x, y in chunk])
            else:
                chunk_reader = local_chunk
            row = run_setting(chunk_reader, positions, read_ahead, args.chunk, cfg, args.seed)
            t = storage.telemetry.take()
            pairs = row['pairs']
            out = dict(base, setting=name, source='local disk' if not endpoint else
                       'bucket' + (f' + {int(delay * 1000)} ms per request proxy'
                                   if proxy_url else ' direct'),
                       delay_ms=int(delay * 1000), read_ahead=read_ahead, **row)
            if endpoint:
                sizes = counting.sizes or [0]
                out.update(requests_per_pair=round(t['requests'] / pairs, 2),
                           kb_per_pair=round(t['bytes'] / pairs / 1024, 1),
                           fetch_calls=len(counting.sizes),
                           ranges_per_fetch=round(float(np.mean(sizes)), 1),
                           requests_in_flight_max=int(max(sizes)) * row['fetches_in_flight'],
                           fetch_latency_mean_ms=round(t['latency_mean_ms'], 1),
                           fetch_latency_p99_ms=round(t['latency_p99_ms'], 1),
                           retries=t['retries'], errors=t['errors'],
                           server_cpu_ms_per_pair=round(
                               1000 * (process_tree_cpu_s(server.pid) - server_cpu0) / pairs, 3))
                if proxy_url:
                    stats = objstore_proxy.control(proxy_url)
                    out.update(proxy_http_requests_per_pair=round(stats['requests'] / pairs, 2))
            out.update(load_avg_1m=[round(load0[0], 2), round(os.getloadavg()[0], 2)])
            return out

        # The path layer alone: read_ranges of the tiles of the same squares, no decode.
        def path_layer(name, endpoint, batch):
            lv = index.levels[0]
            keys = []
            for x, y in positions:
                keys.extend(remote_tiles._tiles_of(lv, index.width0, x, y, PATCH, PATCH))
            ranges = [(int(lv.offsets[k]), int(lv.offsets[k] + lv.counts[k])) for k in keys]
            storage.read_ranges(slide_url, ranges[:4])   # warm
            storage.telemetry.take()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for i in range(0, len(ranges), batch):
                storage.read_ranges(slide_url, ranges[i:i + batch])
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            t = storage.telemetry.take()
            return dict(bench='objstore_read_path_layer', setting=name, batch=batch,
                        requests=t['requests'], mb=round(t['bytes'] / 2**20, 1),
                        cpu_ms_per_request=round(1000 * cpu / t['requests'], 3),
                        requests_per_s=round(t['requests'] / wall, 1),
                        load_avg_1m=round(os.getloadavg()[0], 2),
                        machine=base['machine'], command=base['command'])

        for round_ in range(args.rounds):
            rows = [measure('local', None, 0.0, 1)]
            route(server_url)
            for k in [1] + args.read_ahead:
                rows.append(measure(f'bucket_direct_k{k}', server_url, 0.0, k))
            for delay in args.delays:
                with objstore_proxy.spawn(server_url, flavor='gcs', delay=delay) as proxy_url:
                    route(proxy_url)
                    for k in [1] + args.read_ahead:
                        rows.append(measure(f'bucket_{int(delay * 1000)}ms_k{k}', proxy_url,
                                            delay, k, proxy_url))
                route(server_url)
            ref = rows[0]
            for row in rows:
                row['round'] = round_
                row['vs_local_pairs_per_s'] = round(row['pairs_per_s'] / ref['pairs_per_s'], 2)
                row['vs_local_pairs_per_cpu_s'] = round(
                    row['pairs_per_cpu_s'] / ref['pairs_per_cpu_s'], 2)
                emit(row)
        route(server_url)
        for batch in (4, 32):
            emit(path_layer('bucket_direct', server_url, batch))
        with objstore_proxy.spawn(server_url, flavor='gcs', delay=0.05) as proxy_url:
            route(proxy_url)
            emit(path_layer('bucket_50ms', proxy_url, 32))
        if args.loader_copies > 0:
            loader_phase(args, base, workdir, server, server_url, bucket)
    finally:
        if server is not None:
            objstore._stop(server)
        if log is not None:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def loader_phase(args, base, workdir, server, server_url, bucket):
    """The same comparison through the training loader itself (data.create_train_loader:
    SlideSource over RemoteSlide for a tiling in the bucket, reading ahead the rest of each
    batch; array_record for the packed dataset), on copies of the real CC0 slide; one JSON
    line per setting. Small slides: its shared tile cache hits more than on 40x slides."""
    from bench import objstore_proxy
    route(server_url)
    prepared = prepare_loader_data(workdir, args.loader_copies, bucket)
    if prepared is None:
        emit(dict(bench='objstore_read_loader', skipped=f'no shared slide at {SHARED_SLIDE}',
                  command=base['command']))
        return
    local_tiles, bucket_tiles, packed = prepared
    common = dict(bench='objstore_read_loader', machine=base['machine'],
                  command=base['command'], patch=PATCH, batch_size=32,
                  workers=args.loader_workers,
                  slides=f'{args.loader_copies} copies of cmu-1-small-region.svs (CC0, JPEG, '
                         '240 px tiles), tiled at 224 px, 0.5 um/px')
    cache = os.path.join(workdir, 'slide-cache')
    server_cpu = [lambda: process_tree_cpu_s(server.pid)]

    def one(name, path, delay, proxy_url=None):
        def others():
            cpu = server_cpu[0]()
            return cpu + (objstore_proxy.control(proxy_url)['cpu_s'] if proxy_url else 0.0)
        load0 = os.getloadavg()[0]
        row = time_loader(path, args.loader_batches, 32, args.loader_workers, args.seed,
                          cache, others)
        out = dict(common, setting=name, data_path=path.replace(workdir, '<tmp>'),
                   delay_ms=int(delay * 1000), **row,
                   load_avg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)])
        if proxy_url:   # the warm-up's requests included
            out['proxy_http_requests_per_pair_incl_warmup'] = round(
                objstore_proxy.control(proxy_url)['requests'] / row['pairs'], 2)
        return out

    # The packed dataset last, its slow setting at the very end: grain's prefetch thread may
    # still be inside an array_record read when the loader is closed (it cannot be
    # cancelled), and against a stopped proxy that read never returns (see main's exit).
    rows = [one('loader_local', local_tiles, 0.0)]
    route(server_url)
    rows.append(one('loader_bucket_direct', bucket_tiles, 0.0))
    for delay in args.delays:
        with objstore_proxy.spawn(server_url, flavor='gcs', delay=delay) as proxy_url:
            route(proxy_url)
            rows.append(one(f'loader_bucket_{int(delay * 1000)}ms', bucket_tiles, delay,
                            proxy_url))
        route(server_url)
    rows.append(one('loader_packed_direct', packed, 0.0))
    slowest = max(args.delays)
    with objstore_proxy.spawn(server_url, flavor='gcs', delay=slowest) as proxy_url:
        route(proxy_url)
        rows.append(one(f'loader_packed_{int(slowest * 1000)}ms', packed, slowest, proxy_url))
        route(server_url)
    for row in rows:
        row['vs_local_pairs_per_s'] = round(row['pairs_per_s'] / rows[0]['pairs_per_s'], 2)
        row['vs_local_pairs_per_cpu_s'] = round(
            row['pairs_per_cpu_s'] / rows[0]['pairs_per_cpu_s'], 2)
        emit(row)


if __name__ == '__main__':
    main()
    # Not a normal exit: a grain prefetch thread of the last loader may be blocked in an
    # array_record read whose proxy is gone (array_record retries for minutes), and the
    # interpreter would wait for it. Everything is printed and cleaned up by now.
    sys.stdout.flush()
    os._exit(0)
