"""Parameter count and forward GFLOPs (batch 1) of the model a train.py command would build, with train.py's defaults.

    python scripts/model_size.py                              # the spec's UNet at 256^2 (30.3M parameters)
    python scripts/model_size.py --channel_mults 1 2 4 4      # its "~14M" reading (14.8M)
    python scripts/model_size.py --save_standin DIR           # a tiny random UNet2DModel with the celebahq block types
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import models  # noqa: E402


def main(argv=None):
    d = config.RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--base_channels", type=int, default=d.base_channels)
    p.add_argument("--channel_mults", type=int, nargs="+", default=list(d.channel_mults))
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--hf_model", default=d.hf_model)
    p.add_argument("--save_standin", metavar="DIR",
                   help="write a tiny random UNet2DModel with the celebahq block types to DIR (a stand-in for --hf_model "
                        "where the hub is unreachable) and print its size")
    args = p.parse_args(argv)
    if args.save_standin:
        models.save_standin(args.save_standin)
        args.pretrained, args.hf_model = True, args.save_standin
    network = models.build_model(models.model_config(
        pretrained=args.pretrained, in_channels=args.channels, image_size=args.image_size, base_channels=args.base_channels,
        channel_mults=args.channel_mults, dropout=d.dropout, hf_model=args.hf_model))
    channels = network.in_channels if args.pretrained else args.channels
    params = sum(p.numel() for p in network.parameters())
    print(f"params={params} gflops={models.count_flops(network.eval(), args.image_size, channels) / 1e9:.2f}")


if __name__ == "__main__":
    main()
