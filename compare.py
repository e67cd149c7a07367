"""Train several runs for a time budget each, evaluate them the same way, and tabulate and plot the results.

    python compare.py budgets --minutes 5,20,45   # the default recipe at each budget: FID against minutes
    python compare.py variants --minutes 4         # what to predict, which loss, which network

Each run lives in ROOT/NAME (its run folder and eval.json); a run whose eval.json is
already there is reused, so an interrupted comparison picks up where it stopped. The table (markdown)
and the figure go to --out-dir.
"""
import argparse
import json
import os
import sys

import torch

import figures
import run

# The seeds' variants, each against the design card's eps / mse / U-Net; all without labels. The default MLP
# matches the U-Net's parameters; the wide one is wider than the image, so the noise can pass through it.
VARIANTS = {
    "eps, mse, unet (design card)": [],
    "x0, mse, unet": ["--objective", "x0"],
    "mean, mse, unet": ["--objective", "mean"],
    "eps, l1, unet": ["--loss", "l1"],
    "eps, mse, mlp": ["--arch", "mlp"],
    "eps, mse, mlp 1024 wide x 4": ["--arch", "mlp", "--width", "1024", "--depth", "4"],
}


def folder(name):
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def train_and_eval(root, name, train_flags, eval_flags, common):
    """Train ROOT/NAME unless its eval.json exists, and evaluate it; returns a result row."""
    d = os.path.join(root, folder(name))
    report = os.path.join(d, "eval.json")
    if os.path.exists(report):
        print(f"{name}: reusing {report}")
    else:
        if run.main(["--mode", "train", "--ckpt-dir", d, *train_flags, *common]) != 0:
            sys.exit(f"error: training {name} failed")
        ckpt = run.latest_checkpoint(d)
        # The classifier cache stays in the default checkpoints/ folder, shared by every run.
        if run.main(["--mode", "eval", "--checkpoint", ckpt, "--out-dir", d, *eval_flags, *common]) != 0:
            sys.exit(f"error: evaluating {name} failed")
    result = json.load(open(report))
    ckpt = run.load_checkpoint(result["checkpoint"])
    log = ckpt["log"]
    images = sum(r["images_per_s"] * r["seconds"] for r in log)
    return {**result, "name": name, "minutes": ckpt["elapsed"] / 60, "train_steps": ckpt["step"],
            "parameters": sum(v.numel() for v in ckpt["model"].values()),
            "images_per_s": images / sum(r["seconds"] for r in log)}


def table(rows):
    head = ("| run | minutes | steps | parameters | train img/s | FID | precision | recall | confident | entropy |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    line = ("| {name} | {minutes:.1f} | {train_steps} | {parameters:,} | {images_per_s:.0f} | {fid:.1f} "
            "| {precision:.3f} | {recall:.3f} | {confident:.3f} | {entropy:.3f} |\n")
    body = "".join(line.format(**{**r, **r["samples"]}) for r in rows)
    floor = rows[0]["real"]
    return head + body + line.format(name=f"real images, N={rows[0]['n']} (floor)", minutes=0, train_steps=0,
                                     parameters=0, images_per_s=0, **floor).replace("| 0.0 | 0 | 0 | 0 |", "| | | | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["budgets", "variants"])
    p.add_argument("--minutes", default=None, help="budgets: a list like 5,20,45; variants: one number (4)")
    p.add_argument("--root", default="experiments", help="where the runs go (default experiments)")
    p.add_argument("--out-dir", default="gen", help="table and figure (default gen)")
    p.add_argument("--n-samples", type=int, default=None, help="eval N (default: budgets 1000, variants 500)")
    p.add_argument("--data-dir", default="dataset/mnist")
    args = p.parse_args(argv)
    common = ["--data-dir", args.data_dir]
    os.makedirs(args.out_dir, exist_ok=True)

    if args.what == "budgets":
        minutes = [float(m) for m in (args.minutes or "5,20,45").split(",")]
        eval_flags = ["--n-samples", str(args.n_samples or 1000)]
        rows = [train_and_eval(args.root, f"default, {m:g} min", ["--minutes", f"{m:g}"], eval_flags, common)
                for m in minutes]
        series = {"no label": [(r["minutes"], r["samples"]["fid"]) for r in rows]}
        if all("guided" in r for r in rows):
            series[f"digits 0-9 asked, guidance {rows[0]['guidance']:g}"] = [(r["minutes"], r["guided"]["fid"])
                                                                             for r in rows]
        fig = figures.fid_curve(series, rows[0]["real"]["fid"],
                                f"default recipe: FID (N={rows[0]['n']}) against the training budget")
        run.save_figure(fig, os.path.join(args.out_dir, "budgets.png"))
        rows = [row for r in rows for row in [dict(r, name=f"{r['name']}, no label")] + (
            [dict(r, name=f"{r['name']}, digits asked, W={r['guidance']:g}", samples=r["guided"])]
            if "guided" in r else [])]
    else:
        m = float(args.minutes or 4)
        eval_flags = ["--n-samples", str(args.n_samples or 500)]
        rows = [train_and_eval(args.root, name, ["--minutes", f"{m:g}", "--unconditional", *flags], eval_flags,
                               common) for name, flags in VARIANTS.items()]
        grids = []
        for r in rows:
            ckpt = run.load_checkpoint(r["checkpoint"])
            diffusion = run.Diffusion(**ckpt["diffusion_config"])
            model = run.build_network(ckpt["model_config"])
            model.load_state_dict(ckpt["ema"])
            denoise = run.denoiser(model.eval(), torch.device("cpu"), None)
            grids.append(run.generate(denoise, diffusion, 64, 50, 1.0, torch.device("cpu"), seed=0))
        run.save_figure(figures.panels(grids, [f"{r['name']}\nFID {r['samples']['fid']:.0f}" for r in rows]),
                        os.path.join(args.out_dir, "variants.png"))
    text = table(rows)
    print(text)
    with open(os.path.join(args.out_dir, f"{args.what}.md"), "w") as f:
        f.write(text)
    print(f"wrote {args.out_dir}/{args.what}.md and {args.out_dir}/{args.what}.png")


if __name__ == "__main__":
    main()
