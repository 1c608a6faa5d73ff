"""Why ESPNet loses at a finer level 3: what its decoder sees, and where its cells are registered.

ESPNet's decoder upsamples the level-3 class scores (stride 8) with a kernel = stride = 2 transposed conv: output cell
``2i + a`` gets ``W[a] s[i]``, the phase-0 score of coarse cell ``i`` for both ``a``. In the à trous network
(``polyglean.phase.atrous``, level 3 at stride 4) that conv becomes a 1x1 conv with each cell's own sub-kernel,
``W[a] s_fine[2i + a]``: the same weights, but cell ``2i + 1`` now gets its own phase's score instead of its
neighbour's. So the decoder sees a score map that varies at stride 4 where it was trained on one that varies at
stride 8 (in 2x2 blocks), and the content of the odd cells sits half a stride-4 cell (2 px) from where the trained
model had it. This script measures, on CamVid val images evenly spread:

- mIoU and boundary mIoU (3 px) of the native model and of the à trous network moved by 0, ±1, ±2 and ±4 px, to see
  whether the loss is a registration offset (it would recover at some shift) or the finer content itself;
- how much the decoder's input changes: the relative L1 difference of the upsampled level-3 scores, à trous against
  native.

    PYTHONPATH=$PWD python scripts/stitch_decoder.py --data ../shared/data/camvid --images 101 \
        --json docs/stitch-espnet-decoder.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from polyglean.data.segmentation import SegmentationDataset
from polyglean.experiments.stitch import translate
from polyglean.io import write_json
from polyglean.metrics_dense import DenseMeter
from polyglean.models import get_preset, load_model
from polyglean.phase.atrous import atrous
from polyglean.provenance import machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="camvid folder (val/, valannot/)")
    p.add_argument("--images", type=int, default=101, help="images, evenly spread over val")
    p.add_argument("--sites", default="encoder.level3_0.c1.conv")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model, pre = load_model("camvid-espnet")
    model.eval()
    preset = get_preset("camvid-espnet")
    sites = args.sites.split(",")
    fine = atrous(model, sites, input_size=pre.input_size)
    ds = SegmentationDataset(args.data / "val", args.data / "valannot", pre, num_classes=preset.num_classes,
                             ignore_index=preset.ignore_index)
    n = len(ds)
    picks = sorted({round(i * (n - 1) / max(1, args.images - 1)) for i in range(args.images)})
    ups: dict[str, Tensor] = {}
    handles = [model.up_l3[0].register_forward_hook(lambda m, i, o: ups.__setitem__("native", o)),
               fine.get_submodule("up_l3.0").register_forward_hook(lambda m, i, o: ups.__setitem__("fine", o))]
    meters: dict[str, DenseMeter] = {}
    change: list[float] = []
    try:
        with torch.no_grad():
            for i in picks:
                x, y = ds[i]
                x = x[None]
                outs = {"native": model(x)}
                a = fine(x)
                change.append(float((ups["fine"] - ups["native"]).abs().sum() / ups["native"].abs().sum()))
                for k in (0, 1, -1, 2, -2, 4, -4):
                    outs[f"atrous, moved {k:+d} px" if k else "atrous"] = translate(a, (k, k)) if k else a
                for k, v in outs.items():
                    meters.setdefault(k, DenseMeter(preset.num_classes, preset.ignore_index)).update(v.argmax(1), y[None])
    finally:
        for h in handles:
            h.remove()
    rows = [{"variant": k, "miou": m.scores()["miou"], "boundary_miou_k3": m.scores()["boundary_miou_k3"]}
            for k, m in meters.items()]
    print(f"ESPNet, {len(picks)} camvid/val images, finer at {sites}")
    for r in rows:
        print(f"  {r['variant']:28s} mIoU {r['miou']:6.2f}  boundary3 {r['boundary_miou_k3']:6.2f}")
    mean_change = sum(change) / len(change)
    print(f"  upsampled level-3 scores (the decoder's input), relative L1 change à trous vs native: {mean_change:.3f}")
    if args.json:
        write_json(args.json, {"images": [ds.samples[i][0].name for i in picks], "sites": sites, "rows": rows,
                               "decoder_input_relative_change": mean_change, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
