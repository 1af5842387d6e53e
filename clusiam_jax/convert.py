r"""Convert between the original PyTorch CluSiam/CluBYOL and this project.

  # an original checkpoint -> a work directory that launch.py --mode export takes
  python -m clusiam_jax.convert from-torch checkpoint_0049.pth.tar --out runs/imported \
      [--model clusiam|clubyol] [--mean 0.6684 0.5115 0.6791 --std 0.2521 0.2875 0.2100]

  # a run's encoder -> torchvision weights (safetensors, fc removed), or with the projector
  python -m clusiam_jax.convert to-torch --workdir runs/clusiam --out clusiam_r18.safetensors \
      [--with-projector] [--target] [--step N]

Load the export in PyTorch:
  net = torchvision.models.resnet18(); net.fc = torch.nn.Identity()
  net.load_state_dict(safetensors.torch.load_file('clusiam_r18.safetensors'), strict=True)
`from-torch` needs torch (requirements-torch.txt); `to-torch` does not.
"""
import argparse
import json
import sys


def _parser():
    parser = argparse.ArgumentParser(prog='python -m clusiam_jax.convert',
                                     description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    imp = sub.add_parser('from-torch', help='original checkpoint -> work directory')
    imp.add_argument('checkpoint', help='.pth/.pth.tar of the original (or a bare state_dict)')
    imp.add_argument('--out', required=True, help='work directory to create')
    imp.add_argument('--model', choices=('clusiam', 'clubyol'), default=None,
                     help='expected method (default: detected from target_encoder.* keys)')
    imp.add_argument('--seed', type=int, default=0, help='train.seed of the new work directory')
    imp.add_argument('--mean', type=float, nargs=3, default=None,
                     help="the training normalization's per-channel mean (data.mean)")
    imp.add_argument('--std', type=float, nargs=3, default=None, help='... and std (data.std)')

    exp = sub.add_parser('to-torch', help="a run's encoder -> torchvision safetensors")
    exp.add_argument('--workdir', required=True, help='run (or imported) work directory')
    exp.add_argument('--out', required=True, help='.safetensors file to write')
    exp.add_argument('--with-projector', action='store_true',
                     help="include the projector as the original's encoder.fc (fc.0..fc.7)")
    exp.add_argument('--target', action='store_true',
                     help="BYOL-type runs: export the EMA target encoder instead")
    exp.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if (getattr(args, 'mean', None) is None) != (getattr(args, 'std', None) is None):
        print('error: give --mean and --std together', file=sys.stderr)
        return 2
    try:
        if args.command == 'from-torch':
            from clusiam_jax.interop.from_torch import import_checkpoint
            config, state = import_checkpoint(args.checkpoint, args.out, args.model,
                                              args.seed, args.mean, args.std)
            m = config.model
            print(f'imported {m.name} ({m.backbone}, D={m.feat_size}, K={m.num_clusters}) '
                  f'into {args.out} at step {int(state.step)}')
        else:
            from clusiam_jax.interop.to_torch import export_run
            metadata = export_run(args.workdir, args.out, args.with_projector, args.target,
                                  args.step)
            print(f'wrote {args.out}: ' + json.dumps(metadata))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
