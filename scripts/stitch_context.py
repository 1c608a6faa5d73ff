"""Which layers of CGNet see a different context in its à trous network, and what that costs in mIoU.

In the à trous network every local op at a fine cell computes what the trained model computes at one of its phases
(the image moved by that phase's displacement): the same context. Only two things differ: the global means of the
context-guided blocks after the site (f_glo: a channel re-weighting from the mean of the whole map, taken over the
finer map) and where the final bilinear upsampling puts the cells (the registration shift). This script measures
both on CamVid images: the channel weights of every f_glo after the site, native against à trous (mean absolute
difference, per block), and the mIoU of

- native (output stride 8);
- à trous, registered (what `polyglean eval --stitch ... --stitch-mode atrous` reports);
- à trous with every f_glo after the site given the native model's channel weights: the phases' outputs
  interleaved with the trained model's own global context (exactly shift-and-stitch of a model whose f_glo
  weights are fixed per image), registered;
- à trous unregistered, and moved by other amounts than the registration shift (1, 3, 4 px).

    PYTHONPATH=$PWD python scripts/stitch_context.py --data ../shared/data/camvid --images 12 \
        --json runs/stitch-context.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("--images", type=int, default=12, help="images, evenly spread over val")
    p.add_argument("--sites", default="level3_0.conv1x1.conv")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, pre = load_model("camvid-cgnet")
    model.eval()
    preset = get_preset("camvid-cgnet")
    sites = args.sites.split(",")
    fine = atrous(model, sites, input_size=pre.input_size)
    shift = 2.0 if len(sites) == 1 else 3.0  # (8 - 8/R) / 2
    ds = SegmentationDataset(args.data / "val", args.data / "valannot", pre, num_classes=preset.num_classes,
                             ignore_index=preset.ignore_index)
    n = len(ds)
    picks = sorted({round(i * (n - 1) / max(1, args.images - 1)) for i in range(args.images)})
    glo = [name for name, _ in fine.named_modules() if name.endswith("F_glo.fc.3")]
    native_w: dict[str, Tensor] = {}
    fine_w: dict[str, Tensor] = {}
    freeze = [False]

    def capture(store: dict[str, Tensor], name: str) -> Any:
        def hook(module: Any, inputs: Any, output: Tensor) -> Tensor | None:
            if store is fine_w and freeze[0]:
                return native_w[name]
            store[name] = output
            return None
        return hook

    means: dict[str, dict[str, Tensor]] = {"native": {}, "fine": {}}

    def grab(which: str, name: str) -> Any:
        return lambda module, inputs: means[which].__setitem__(name, inputs[0])

    handles = [model.get_submodule(g).register_forward_hook(capture(native_w, g)) for g in glo]
    handles += [model.get_submodule(g[:-1] + "0").register_forward_pre_hook(grab("native", g)) for g in glo]
    handles += [fine.get_submodule(g[:-1] + "0").register_forward_pre_hook(grab("fine", g)) for g in glo]
    handles += [fine.get_submodule(g).register_forward_hook(capture(fine_w, g)) for g in glo]
    meters: dict[str, DenseMeter] = {}
    logit_gap: list[float] = []
    diffs: dict[str, list[float]] = {g: [] for g in glo}
    mean_gap: dict[str, list[float]] = {g: [] for g in glo}
    try:
        with torch.no_grad():
            for i in picks:
                x, y = ds[i]
                x = x[None]
                outs = {"native": model(x)}
                a = fine(x)
                for g in glo:
                    diffs[g].append(float((fine_w[g] - native_w[g]).abs().mean()))
                    nm, fm = means["native"][g], means["fine"][g]
                    mean_gap[g].append(float((fm - nm).abs().sum() / nm.abs().sum()))
                freeze[0] = True
                frozen = fine(x)
                freeze[0] = False
                logit_gap.append(float((frozen - a).abs().max() / a.abs().max()))
                outs["atrous, registered"] = translate(a, (shift, shift))
                outs["atrous, native f_glo weights, registered"] = translate(frozen, (shift, shift))
                outs["atrous, unregistered"] = a
                for k in (1, 3, 4):  # the registration shift is (8 - 8/R) / 2; others for comparison
                    if k != shift:
                        outs[f"atrous, moved {k} px"] = translate(a, (k, k))
                for k, v in outs.items():
                    meters.setdefault(k, DenseMeter(preset.num_classes, preset.ignore_index)).update(v.argmax(1), y[None])
    finally:
        for h in handles:
            h.remove()
    rows = [{"variant": k, "miou": m.scores()["miou"], "boundary_miou_k3": m.scores()["boundary_miou_k3"]}
            for k, m in meters.items()]
    print(f"CGNet, {len(picks)} camvid/val images, finer at {sites}")
    for r in rows:
        print(f"  {r['variant']:45s} mIoU {r['miou']:6.2f}  boundary3 {r['boundary_miou_k3']:6.2f}")
    layer_rows = [{"layer": g.removesuffix(".fc.3"), "mean_abs_weight_change": sum(v) / len(v),
                   "relative_mean_change": sum(mean_gap[g]) / len(mean_gap[g])} for g, v in diffs.items()]
    print("  f_glo input (the global mean), relative change |atrous - native|_1 / |native|_1 per block:")
    print("   " + ", ".join(f"{r['layer'].removesuffix('.F_glo')} {r['relative_mean_change']:.1e}"
                            for r in layer_rows))
    print("  f_glo channel weights (sigmoid, 0..1), mean |atrous - native| per block:")
    print("   " + ", ".join(f"{r['layer'].removesuffix('.F_glo')} {r['mean_abs_weight_change']:.1e}"
                            for r in layer_rows))
    print(f"  largest logit difference, native f_glo weights against à trous ones (relative): {max(logit_gap):.1e}")
    if args.json:
        write_json(args.json, {"images": [ds.samples[i][0].name for i in picks], "sites": sites, "rows": rows,
                               "f_glo": layer_rows, "max_relative_logit_gap": max(logit_gap),
                               "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
