"""Train several runs for a time budget each, evaluate them the same way, and tabulate and plot the results.

    python compare.py budgets --minutes 5,20,45   # the default recipe at each budget: FID against minutes
    python compare.py variants --minutes 4         # what to predict, which loss, which network

Each run lives in ROOT/NAME (its run folder and eval.json). A run whose eval.json is already there is
reused, and a run stopped mid-training is resumed, so an interrupted comparison picks up where it
stopped. The table (markdown) and the figure go to --out-dir.
"""
import argparse
import dataclasses
import glob
import json
import os
import sys

import torch

import figures
from ckpt import latest_checkpoint, load_checkpoint, save_figure
from diffusion import Diffusion
from errors import UserError
from evaluate import evaluate
from hardware import pick_hardware
from model import build_network
from sample import SampleSettings, denoiser, generate, sampler_plan
from train import TrainSettings, train

# The seeds' variants, each against the design card's eps / mse / U-Net; all without labels. The default MLP
# matches the U-Net's parameters; the wide one is wider than the image, so the noise can pass through it.
VARIANTS = {
    "eps, mse, unet (design card)": {},
    "x0, mse, unet": {"objective": "x0"},
    "mean, mse, unet": {"objective": "mean"},
    "eps, l1, unet": {"loss": "l1"},
    "eps, mse, mlp": {"arch": "mlp"},
    "eps, mse, mlp 1024 wide x 4": {"arch": "mlp", "width": 1024, "depth": 4},
}


def folder(name):
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def train_and_eval(root, name, minutes, given, n_samples, data_dir, device, amp):
    """Train ROOT/NAME for `minutes` with the run settings `given` unless its eval.json exists, and evaluate
    it; returns a result row."""
    d = os.path.join(root, folder(name))
    report = os.path.join(d, "eval.json")
    if os.path.exists(report):
        print(f"{name}: reusing {report}")
    else:
        settings = TrainSettings(data_dir=data_dir, ckpt_dir=d, minutes=minutes, device=device, amp=amp)
        last = latest_checkpoint(d) if glob.glob(os.path.join(d, "run_*", "ckpt_*.pt")) else None
        if last is None:
            code = train(settings, given)
        elif load_checkpoint(last)["elapsed"] < 60 * minutes:  # stopped before its budget: go on
            code = train(dataclasses.replace(settings, resume=last))
        else:
            code = 0
        if code != 0:
            sys.exit(f"error: training {name} failed")
        # The classifier cache stays in the default checkpoints/ folder, shared by every run.
        evaluate(SampleSettings(checkpoint=latest_checkpoint(d), out_dir=d, data_dir=data_dir, n_samples=n_samples,
                                device=device, amp=amp), cache_dir="checkpoints")
    result = json.load(open(report))
    ckpt = load_checkpoint(result["checkpoint"])
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
    try:
        compare(args.what, args.minutes, args.root, args.out_dir, args.n_samples, args.data_dir)
    except UserError as e:
        sys.exit(f"error: {e}")


def compare(what, minutes, root, out_dir, n_samples, data_dir):
    device, amp = pick_hardware()
    os.makedirs(out_dir, exist_ok=True)
    if what == "budgets":
        minutes = [float(m) for m in (minutes or "5,20,45").split(",")]
        rows = [train_and_eval(root, f"default, {m:g} min", m, {}, n_samples or 1000, data_dir, device, amp)
                for m in minutes]
        series = {"no label": [(r["minutes"], r["samples"]["fid"]) for r in rows]}
        if all("guided" in r for r in rows):
            series[f"digits 0-9 asked, guidance {rows[0]['guidance']:g}"] = [(r["minutes"], r["guided"]["fid"])
                                                                             for r in rows]
        fig = figures.fid_curve(series, rows[0]["real"]["fid"],
                                f"default recipe: FID (N={rows[0]['n']}) against the training budget")
        save_figure(fig, os.path.join(out_dir, "budgets.png"))
        rows = [row for r in rows for row in [dict(r, name=f"{r['name']}, no label")] + (
            [dict(r, name=f"{r['name']}, digits asked, W={r['guidance']:g}", samples=r["guided"])]
            if "guided" in r else [])]
    else:
        m = float(minutes or 4)
        rows = [train_and_eval(root, name, m, {"conditional": False, **given}, n_samples or 500, data_dir, device,
                               amp) for name, given in VARIANTS.items()]
        grids = []
        for r in rows:
            ckpt = load_checkpoint(r["checkpoint"])
            diffusion = Diffusion(**ckpt["diffusion_config"])
            model = build_network(ckpt["model_config"])
            model.load_state_dict(ckpt["ema"])
            denoise = denoiser(model.eval(), torch.device("cpu"), None)
            plan = sampler_plan("ddim", None, None, None, diffusion.timesteps)
            grids.append(generate(denoise, diffusion, 64, plan, torch.device("cpu"), seed=0))
        save_figure(figures.panels(grids, [f"{r['name']}\nFID {r['samples']['fid']:.0f}" for r in rows]),
                    os.path.join(out_dir, "variants.png"))
    text = table(rows)
    print(text)
    with open(os.path.join(out_dir, f"{what}.md"), "w") as f:
        f.write(text)
    print(f"wrote {out_dir}/{what}.md and {out_dir}/{what}.png")


if __name__ == "__main__":
    main()
