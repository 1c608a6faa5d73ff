"""What shift-and-stitch and content-adaptive stitching cost, measured: FLOPs (torch.utils.flop_counter) and time
per configuration, on real weights and images.

Cases (dense class-score maps from real models; both can be stitched exactly):

- ``lite0-cam``: EfficientNet-Lite0 (ImageNet weights) without its global pooling: the classifier applied at every
  position of the final feature map (a class activation map), on ImageNet validation images resized to ``--size``.
- ``espnet-encoder``: ESPNet's encoder and its own 1x1 classifier (CamVid weights), on CamVid val images. The full
  ESPNet cannot be stitched (its decoder's transposed convs and skip concatenations need the coarse grid), and the
  encoder's classifier alone is no usable segmenter (about 2 mIoU): this case measures cost only.

Configurations: the plain model; stitching at the last site and at the last two; masked stitching at the last site
with ``edges`` at three trimap widths and ``uncertain`` at three thresholds. Every masked run is checked against
full stitching inside its mask.

    PYTHONPATH=$PWD python scripts/stitch_cost.py --case lite0-cam --data ../shared/data/imagenet-val1300/images \
        --images 8 --json runs/stitch-cost-lite0.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from polyglean.io import write_json
from polyglean.models import load_model
from polyglean.phase.net import PhaseNet
from polyglean.phase.stitch import edge_mask, plan, receptive_halo, stitch_masked, uncertain_mask
from polyglean.provenance import machine


class ClassMap(nn.Module):
    """EfficientNet-Lite0's classifier at every position of its final feature map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        f = self.model.forward_features(x)
        w = self.model.classifier.weight
        return F.conv2d(f, w[:, :, None, None], self.model.classifier.bias)


class ESPNetEncoder(nn.Module):
    """ESPNet's encoder and its 1x1 classifier (the decoder's input), at 1/8 of the input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encoder.classifier(self.model.encode(x)[2])


def build(case: str, size: int) -> tuple[PhaseNet, Callable[[Image.Image], Tensor], list[str]]:
    if case == "lite0-cam":
        model, pre = load_model("imagenet-efficientnet-lite0")
        import torchvision.transforms as T

        norm = [t for t in pre.transform.transforms if isinstance(t, T.Normalize)] if hasattr(
            pre.transform, "transforms") else []
        steps = [T.Resize((size, size)), T.ToTensor(), *norm]
        if not norm:  # Lite0's own scaling: (x*255 - 127) / 128
            steps.append(T.Lambda(lambda t: (t * 255 - 127) / 128))
        net = PhaseNet(ClassMap(model.eval()).eval(), input_size=(3, size, size))
        return net, T.Compose(steps), [net.sites[-2].name, net.sites[-1].name]
    model, pre = load_model("camvid-espnet")
    net = PhaseNet(ESPNetEncoder(model.eval()).eval(), input_size=(3, 360, 480))
    main = [s.name for s in net.sites if "sample2.pool.0" not in s.name]  # the side branch is not on the path
    return net, pre.transform, main[-2:]


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times) if times else float("nan"), int(counter.get_total_flops())


def sweep(net: PhaseNet, transform: Callable[[Image.Image], Tensor], file: Path, last: list[str], sides: list[int],
          out: Path | None) -> int:
    """FLOPs of masked stitching against the mask's area, with square masks in the middle of the map."""
    with Image.open(file) as im:
        x = transform(im.convert("RGB"))[None]
    rows = []
    with torch.no_grad():
        _, _, plain = measure(lambda: net(x), 0)
        _, _, full = measure(lambda: net.stitch(x, last), 0)
        fine = net.stitch(x, last).shape[-2:]
        print(f"plain {plain / 1e9:.2f} GFLOPs, full stitching {full / 1e9:.2f} ({full / plain:.2f}x); fine grid "
              f"{tuple(fine)}")
        print(f"{'side':>5s} {'mask area':>9s} {'GFLOPs':>8s} {'x plain':>8s} {'map run on':>10s} {'tile':>9s}")
        for side in sides:
            mask = torch.zeros(1, *fine, dtype=torch.bool)
            y0, x0 = (fine[0] - side) // 2, (fine[1] - side) // 2
            mask[:, max(0, y0):y0 + side, max(0, x0):x0 + side] = True
            res, _, flops = measure(lambda: stitch_masked(net, x, last, mask), 0)
            rows.append({"side": side, "mask_area": float(mask.float().mean()), "gflops": flops / 1e9,
                         "flop_ratio": flops / plain, "computed_share": res.computed, "tile": list(res.tile)})
            print(f"{side:5d} {float(mask.float().mean()):9.1%} {flops / 1e9:8.2f} {flops / plain:8.2f} "
                  f"{res.computed:10.0%} {str(res.tile):>9s}")
    if out:
        write_json(out, {"image": file.name, "sites": last, "plain_gflops": plain / 1e9, "full_gflops": full / 1e9,
                         "sweep": rows, "machine": machine()})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["lite0-cam", "espnet-encoder"], default="lite0-cam")
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=448, help="input size (lite0-cam)")
    p.add_argument("--widths", type=int, nargs=3, default=[1, 2, 4])
    p.add_argument("--thresholds", type=float, nargs=3, default=[0.3, 0.5, 0.7])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--sweep", type=int, nargs="+", metavar="SIDE",
                   help="instead: FLOPs of masked stitching at the last site for a centred square mask of each "
                        "side (cells of the finer grid), on the first image")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net, transform, sites = build(args.case, args.size)
    last = sites[-1:]
    factor = plan(net, last).factor
    files = sorted(f for f in Path(args.data).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: args.images]
    if args.sweep:
        return sweep(net, transform, files[0], last, args.sweep, args.json)
    configs: list[tuple[str, Callable[[Tensor], Any]]] = [
        ("plain", lambda x: net(x)),
        (f"stitch {last[0]}", lambda x: net.stitch(x, last)),
        (f"stitch {sites[0]}+{sites[1]}", lambda x: net.stitch(x, sites)),
    ]
    for w in args.widths:
        configs.append((f"edges w={w}", lambda x, w=w: stitch_masked(net, x, last, lambda o: edge_mask(o, factor, w))))
    for t in args.thresholds:
        configs.append((f"uncertain t={t}",
                        lambda x, t=t: stitch_masked(net, x, last, lambda o: uncertain_mask(o, factor, t))))
    rows: dict[str, dict[str, list[float]]] = {name: {"flops": [], "time": [], "area": [], "computed": [],
                                                      "max_err": []} for name, _ in configs}
    with torch.no_grad():
        for f in files:
            with Image.open(f) as im:
                x = transform(im.convert("RGB"))[None]
            full = None
            for name, fn in configs:
                out, seconds, flops = measure(lambda: fn(x), args.repeats)
                row = rows[name]
                row["flops"].append(flops)
                row["time"].append(seconds)
                if name.startswith("stitch") and full is None:
                    full = out
                if hasattr(out, "mask"):
                    inside = out.mask[:, None].expand_as(full)
                    err = float((out.output[inside] - full[inside]).abs().max()) if bool(inside.any()) else 0.0
                    row["area"].append(float(out.mask.float().mean()))
                    row["computed"].append(out.computed)
                    row["max_err"].append(err)
    plain_flops = statistics.mean(rows["plain"]["flops"])
    plain_time = statistics.mean(rows["plain"]["time"])
    table = []
    halo = receptive_halo(net, plan(net, last))
    print(f"{args.case}: {len(files)} images, sites {sites}, halo at the last site {halo}")
    print(f"{'configuration':28s} {'GFLOPs':>8s} {'x plain':>8s} {'time x':>7s} {'mask':>6s} {'run on':>7s} "
          f"{'max err':>8s}")
    for name, row in rows.items():
        entry = {
            "configuration": name,
            "gflops": statistics.mean(row["flops"]) / 1e9,
            "flop_ratio": statistics.mean(row["flops"]) / plain_flops,
            "time_ratio": statistics.mean(row["time"]) / plain_time,
            "mask_area": statistics.mean(row["area"]) if row["area"] else None,
            "computed_share": statistics.mean(row["computed"]) if row["computed"] else None,
            "max_err_inside_mask": max(row["max_err"]) if row["max_err"] else None,
        }
        table.append(entry)
        area = f"{entry['mask_area']:.0%}" if entry["mask_area"] is not None else "-"
        comp = f"{entry['computed_share']:.0%}" if entry["computed_share"] is not None else "-"
        err = f"{entry['max_err_inside_mask']:.1e}" if entry["max_err_inside_mask"] is not None else "-"
        print(f"{name:28s} {entry['gflops']:8.2f} {entry['flop_ratio']:8.2f} {entry['time_ratio']:7.2f} "
              f"{area:>6s} {comp:>7s} {err:>8s}")
    if args.json:
        write_json(args.json, {"case": args.case, "images": [f.name for f in files], "sites": sites,
                               "size": args.size, "halo": list(halo), "results": table, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
